// Fused log-prob + entropy on the CPU: one pass over each row of logits,
// no [N, V] temporaries, fp32 accumulation (fp64 for fp64 inputs).
//
// Forward, per row with z = x / T:
//   online over chunks of the vocabulary: m = max x, d = (x - m) / T, s = Σ exp(d), t = Σ exp(d)·d
//   lse = m / T + log s,  entropy = log s - t / s,  logp = (x[y] - m) / T - log s
// Keeping t and logp relative to the running max makes them exact even for
// logits of size 1e4 (no lse - Σp·z or z[y] - lse cancellation).
//
// Backward, per element with lp = z - lse, p = exp(lp), H the entropy:
//   dz = g_logp·(onehot(y) - p) - g_ent·p·(lp + H);   dlogits = dz / T
// Everything is rebuilt from the saved per-row lse and entropy.
#include "logprobs.h"

#include "../row_io.h"
#include "row_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace rlhf_kernels {
namespace cpu {
namespace {

using namespace detail;

// With d = (src - m)·inv_t (m the raw running maximum): adds Σ exp(d) to *s and Σ exp(d)·d to *t. Subtracting
// before scaling keeps d exact near the maximum however large the logits (src·inv_t - m·inv_t would differ by
// the two products' rounding, ~ulp(src·inv_t), which is 1e-3 at |z| ~ 1e4).
template <typename acc_t>
inline void chunk_sum_exp(const acc_t* src, int64_t n, acc_t inv_t, acc_t m, acc_t* s, acc_t* t) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vm(m), vinv(inv_t);
  // -inf logits give exp = 0; clamping the shift keeps 0·(-inf) from becoming NaN.
  const Vec floor_shift(-std::numeric_limits<acc_t>::max());
  Vec vs(0), vt(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec d = (Vec::loadu(src + i) - vm) * vinv;
    Vec e = fast_exp(d);
    vs = vs + e;
    vt = at::vec::fmadd(e, at::vec::maximum(d, floor_shift), vt);
  }
  if (i < n) {
    const int64_t rest = n - i;
    // Lanes past the tail become -inf so they add exactly 0 (loadu zero-fills them).
    Vec d = Vec::set(Vec(neg_inf<acc_t>()), (Vec::loadu(src + i, rest) - vm) * vinv, rest);
    Vec e = fast_exp(d);
    vs = vs + e;
    vt = at::vec::fmadd(e, at::vec::maximum(d, floor_shift), vt);
  }
  *s += at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vs);
  *t += at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vt);
}

// dst[0:n] = p·(a + b·lp) with lp = z - lse, z = src·inv_t rounded (as the forward's lse, which holds the
// maximum's rounded z; one FMA would not round it), p = exp(lp): the softmax part of dlogits.
template <typename acc_t>
inline void chunk_grad(const acc_t* src, int64_t n, acc_t inv_t, acc_t lse, acc_t a, acc_t b, acc_t* dst) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vinv(inv_t), vlse(lse), va(a), vb(b);
  // Where p underflows to 0 (lp < -745 even in fp64) the clamp keeps 0·(-inf) and 0·(b·huge) out.
  const Vec floor_lp(acc_t(-1e4));
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t lanes = std::min<int64_t>(Vec::size(), n - i);
    Vec lp = Vec::loadu(src + i, lanes) * vinv - vlse;
    Vec p = fast_exp(lp);
    (p * at::vec::fmadd(vb, at::vec::maximum(lp, floor_lp), va)).store(dst + i, lanes);
  }
}

template <typename scalar_t>
void forward_rows(
    const scalar_t* logits,
    int64_t rows_inner,  // T: rows per outer index
    int64_t stride_outer,
    int64_t stride_inner,
    int64_t vocab,
    const int64_t* targets,
    int64_t ignore_index,
    double temperature,
    acc_type_t<scalar_t>* logp_out,
    acc_type_t<scalar_t>* entropy_out,
    acc_type_t<scalar_t>* lse_out,
    int64_t begin,
    int64_t end) {
  using acc_t = acc_type_t<scalar_t>;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  alignas(64) acc_t buf[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = row_at(logits, row, rows_inner, stride_outer, stride_inner);
    acc_t m = neg_inf<acc_t>(), s = 0, t = 0;
    bool has_nan = false;  // a NaN or +inf logit: the row's outputs are NaN
    for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
      const int64_t n = std::min(kChunk, vocab - c0);
      const acc_t* src = chunk_source(x + c0, n, buf);
      const acc_t cm = chunk_max(src, n);  // raw units: m is the row's largest logit so far
      // +inf too: lse = inf, so every log-prob is -inf or inf - inf (the oracle's NaN, as the GPU kernels'); without
      // this the shifted exps (-inf, NaN) reached fast_exp, which clamps NaN, and a finite row's logp came out -inf
      if (std::isnan(cm) || cm == std::numeric_limits<acc_t>::infinity()) {
        has_nan = true;
        break;
      }
      if (cm > m) {
        if (m != neg_inf<acc_t>()) {
          const acc_t shift = (m - cm) * inv_t;
          const acc_t f = std::exp(shift);
          t = (t + s * shift) * f;
          s *= f;
        }
        m = cm;
      }
      if (m == neg_inf<acc_t>()) continue;  // every entry so far is -inf: contributes nothing
      chunk_sum_exp(src, n, inv_t, m, &s, &t);
    }
    acc_t lse, entropy, log_s;
    if (has_nan) {
      lse = entropy = log_s = std::numeric_limits<acc_t>::quiet_NaN();
    } else {
      log_s = std::log(s);
      lse = m * inv_t + log_s;
      entropy = log_s - t / s;
    }
    const int64_t y = targets[row];
    acc_t logp;
    if (y == ignore_index) {
      logp = 0;
      entropy = 0;
    } else if (y < 0 || y >= vocab) {
      logp = std::numeric_limits<acc_t>::quiet_NaN();  // unvalidated bad target: never read out of bounds
    } else {
      // Relative to the maximum, as the CUDA and Triton kernels: z[y] - lse would cancel to ulp(lse) for |z| ~ 1e4.
      logp = (static_cast<acc_t>(x[y]) - m) * inv_t - log_s;
    }
    logp_out[row] = logp;
    entropy_out[row] = entropy;
    lse_out[row] = lse;
  }
}

template <typename scalar_t>
void backward_rows(
    const scalar_t* logits,
    int64_t rows_inner,
    int64_t stride_outer,
    int64_t stride_inner,
    int64_t vocab,
    const int64_t* targets,
    int64_t ignore_index,
    double temperature,
    const acc_type_t<scalar_t>* grad_logp,
    const acc_type_t<scalar_t>* grad_entropy,
    const acc_type_t<scalar_t>* lse_in,
    const acc_type_t<scalar_t>* entropy_in,
    scalar_t* grad_out,  // [B, T, V]: row (b, t) at b·grad_stride_outer + t·grad_stride_inner
    int64_t grad_stride_outer,
    int64_t grad_stride_inner,
    int64_t begin,
    int64_t end) {
  using acc_t = acc_type_t<scalar_t>;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  alignas(64) acc_t buf[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = row_at(logits, row, rows_inner, stride_outer, stride_inner);
    scalar_t* dx = row_at(grad_out, row, rows_inner, grad_stride_outer, grad_stride_inner);
    const int64_t y = targets[row];
    if (y == ignore_index) {
      std::fill(dx, dx + vocab, scalar_t(0));
      continue;
    }
    const bool target_ok = y >= 0 && y < vocab;
    const acc_t g_logp = static_cast<acc_t>(grad_logp[row]);
    const acc_t g_ent = static_cast<acc_t>(grad_entropy[row]);
    // dlogits = p·(a + b·lp) + onehot(y)·g_logp/T with a = -(g_logp + g_ent·H)/T, b = -g_ent/T
    const acc_t a = -(g_logp + g_ent * static_cast<acc_t>(entropy_in[row])) * inv_t;
    const acc_t b = -g_ent * inv_t;
    const acc_t lse = static_cast<acc_t>(lse_in[row]);
    const acc_t onehot = g_logp * inv_t;
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      chunk_grad(x, vocab, inv_t, lse, a, b, dx);  // straight into the output: no staging copy
      if (target_ok) dx[y] += onehot;
    } else {
      for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
        const int64_t n = std::min(kChunk, vocab - c0);
        chunk_grad(chunk_source(x + c0, n, buf), n, inv_t, lse, a, b, buf);
        if (target_ok && y >= c0 && y < c0 + n) buf[y - c0] += onehot;  // before rounding to the dtype
        for (int64_t j = 0; j < n; ++j) dx[c0 + j] = static_cast<scalar_t>(buf[j]);
      }
    }
  }
}

struct RowLayout {
  int64_t outer, inner, vocab, stride_outer, stride_inner;
};

RowLayout check_layout(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 3, "logits must be viewed as [B, T, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(2) == 1, "logits must have unit stride over the vocabulary");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64");
  TORCH_CHECK(targets.is_contiguous() && targets.numel() == logits.size(0) * logits.size(1),
              "targets must be a contiguous tensor with B*T elements");
  TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu(), "the cpu kernels need CPU tensors");
  return {logits.size(0), logits.size(1), logits.size(2), logits.stride(0), logits.stride(1)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd(
    const at::Tensor& logits, const at::Tensor& targets, double temperature, int64_t ignore_index) {
  const RowLayout L = check_layout(logits, targets);
  const int64_t rows = L.outer * L.inner;
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(out_dtype);
  at::Tensor logp = at::empty({L.outer, L.inner}, opts);
  at::Tensor entropy = at::empty({L.outer, L.inner}, opts);
  at::Tensor lse = at::empty({L.outer, L.inner}, opts);
  if (rows == 0) return {logp, entropy, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_fwd_cpu", [&] {
    using out_t = float_or_double_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* y = targets.const_data_ptr<int64_t>();
    out_t* lp = logp.data_ptr<out_t>();
    out_t* ent = entropy.data_ptr<out_t>();
    out_t* ls = lse.data_ptr<out_t>();
    at::parallel_for(0, rows, grain_for(L.vocab), [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(x, L.inner, L.stride_outer, L.stride_inner, L.vocab, y, ignore_index,
                             temperature, lp, ent, ls, begin, end);
    });
  });
  return {logp, entropy, lse};
}

void logprobs_bwd_out(
    const at::Tensor& grad_logp,
    const at::Tensor& grad_entropy,
    const at::Tensor& logits,
    const at::Tensor& targets,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    double temperature,
    int64_t ignore_index,
    at::Tensor& grad) {
  const RowLayout L = check_layout(logits, targets);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() && grad.stride(2) == 1 &&
                  grad.device().is_cpu(),
              "grad must be a CPU tensor shaped like logits ", logits.sizes(), " of its dtype with unit vocab stride, got ",
              grad.sizes(), " ", grad.scalar_type(), " strides ", grad.strides());
  io::check_not_partly_over(grad, logits, "grad");  // it may be logits itself (logprobs(overwrite_logits=True))
  const int64_t rows = L.outer * L.inner;
  const auto stat_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_logp, &grad_entropy, &lse, &entropy}) {
    TORCH_CHECK(t->numel() == rows && t->scalar_type() == stat_dtype,
                "per-row inputs of logprobs_bwd must have B*T elements of the statistics dtype");
  }
  const at::Tensor g_lp = grad_logp.contiguous(), g_ent = grad_entropy.contiguous();
  const at::Tensor lse_c = lse.contiguous(), ent_c = entropy.contiguous();
  if (rows == 0) return;
  advise_huge_pages(grad);
  const int64_t gs_outer = grad.stride(0), gs_inner = grad.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_bwd_cpu", [&] {
    using out_t = float_or_double_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* y = targets.const_data_ptr<int64_t>();
    scalar_t* dx = grad.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(L.vocab), [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t>(x, L.inner, L.stride_outer, L.stride_inner, L.vocab, y, ignore_index, temperature,
                              g_lp.const_data_ptr<out_t>(), g_ent.const_data_ptr<out_t>(),
                              lse_c.const_data_ptr<out_t>(), ent_c.const_data_ptr<out_t>(), dx, gs_outer,
                              gs_inner, begin, end);
    });
  });
}

at::Tensor logprobs_bwd(
    const at::Tensor& grad_logp,
    const at::Tensor& grad_entropy,
    const at::Tensor& logits,
    const at::Tensor& targets,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    double temperature,
    int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 3, "logits must be viewed as [B, T, V], got ", logits.sizes());
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  logprobs_bwd_out(grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index, grad);
  return grad;
}

}  // namespace cpu
}  // namespace rlhf_kernels
