// GAE on the CPU: one reverse scan per sequence, sequences in parallel.
//   δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t,   A_t = δ_t + γλ·A_{t+1}·m_{t+1},
//   returns = A + V; both zeroed where m_t == 0.
#include "advantages.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

namespace rlhf_kernels {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> gae(
    const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK(values.dim() == 2, "values must be [B, T], got ", values.sizes());
  TORCH_CHECK(rewards.sizes() == values.sizes() && mask.sizes() == values.sizes(),
              "rewards, values and mask must share one [B, T] shape");
  // 16-bit values scan in float32 (as the CUDA and Triton kernels) and come back in their dtype: the scan's
  // running advantage must not be rounded to 8 bits at every step, nor the rewards before it.
  const at::ScalarType out_type = values.scalar_type();
  const at::ScalarType scan_type = at::isReducedFloatingType(out_type) ? at::kFloat : out_type;
  const at::Tensor r = rewards.to(scan_type).contiguous();
  const at::Tensor v = values.to(scan_type).contiguous();
  const at::Tensor m = mask.to(scan_type).contiguous();
  at::Tensor adv = at::empty_like(v);
  at::Tensor ret = at::empty_like(v);
  const int64_t B = v.size(0), T = v.size(1);
  AT_DISPATCH_FLOATING_TYPES(scan_type, "gae_cpu", [&] {
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    scalar_t* ap = adv.data_ptr<scalar_t>();
    scalar_t* tp = ret.data_ptr<scalar_t>();
    const scalar_t g = static_cast<scalar_t>(gamma), gl = static_cast<scalar_t>(gamma * lam);
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t o = b * T;
        scalar_t next_value = 0, next_adv = 0, next_mask = 0;
        for (int64_t t = T - 1; t >= 0; --t) {
          const scalar_t delta = rp[o + t] + g * next_value * next_mask - vp[o + t];
          const scalar_t a = delta + gl * next_adv * next_mask;
          const scalar_t m = mp[o + t];
          const bool live = m != 0;
          ap[o + t] = live ? a * m : scalar_t(0);
          tp[o + t] = live ? (a + vp[o + t]) * m : scalar_t(0);
          // a masked step passes nothing back: padding's V or r may be NaN / inf, and 0·inf is NaN
          next_value = live ? vp[o + t] : scalar_t(0);
          next_adv = live ? a : scalar_t(0);
          next_mask = m;
        }
      }
    });
  });
  return {adv.to(out_type), ret.to(out_type)};
}

}  // namespace cpu
}  // namespace rlhf_kernels
