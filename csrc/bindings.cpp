// Torch-facing bindings of the compiled kernels.
//
// Raw kernels live in the `rlhf_kernels_C` operator namespace; the public,
// differentiable ops (`rlhf_kernels::*`) are registered from Python with
// torch.library.custom_op and call these.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <torch/python.h>

#include <stdexcept>

#include "cpu/advantages.h"
#include "cpu/kl.h"
#include "cpu/logprobs.h"
#include "row_io.h"

#ifdef RLHF_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"
#endif

#ifndef RLHF_KERNELS_CUDA_ARCHS
#define RLHF_KERNELS_CUDA_ARCHS ""
#endif
#ifndef RLHF_KERNELS_CPU_CAPABILITY
#define RLHF_KERNELS_CPU_CAPABILITY "default"
#endif

namespace rlhf_kernels {

#ifdef RLHF_KERNELS_WITH_CUDA
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK(values.dim() == 2, "values must be [B, T], got ", values.sizes());
  TORCH_CHECK(rewards.sizes() == values.sizes() && mask.sizes() == values.sizes(),
              "rewards, values and mask must share one [B, T] shape");
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor r = rewards.to(at::kFloat).contiguous();
  const at::Tensor v = values.to(at::kFloat).contiguous();
  const at::Tensor m = mask.to(at::kFloat).contiguous();
  at::Tensor adv = at::empty_like(v);
  at::Tensor ret = at::empty_like(v);
  const cudaError_t err = cuda::launch_gae_fp32(
      r.const_data_ptr<float>(), v.const_data_ptr<float>(), m.const_data_ptr<float>(), adv.data_ptr<float>(),
      ret.data_ptr<float>(), v.size(0), v.size(1), static_cast<float>(gamma), static_cast<float>(lam),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gae CUDA kernel failed: ", cudaGetErrorString(err));
  return {adv.to(values.scalar_type()), ret.to(values.scalar_type())};
}

// ---------------------------------------------------------------- row kernels (logprobs, kl, ppo)

cuda::DType cuda_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "the cuda backend's ", what, " kernels take float32 / float16 / bfloat16, got ",
                  t.scalar_type(), " (float64 runs on the cpu or torch backend)");
  }
}

void check_cuda_error(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " CUDA kernel failed: ", cudaGetErrorString(err));
}

// The CUDA bindings' rows and per-row tensors (shared checks: row_io.h).
void check_rows(const at::Tensor& rows, const char* name) { io::check_rows(rows, name, at::kCUDA); }
using io::check_grad_out;
using io::per_row;

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                                  double temperature, int64_t ignore_index) {
  check_rows(logits, "logits");
  const cuda::DType dtype = cuda_dtype(logits, "logprobs");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const at::Tensor y = per_row(targets, B * T, at::kLong, logits, "targets");
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({B, T}, opts), entropy = at::empty({B, T}, opts), lse = at::empty({B, T}, opts);
  check_cuda_error(
      cuda::launch_logprobs_fwd(dtype, logits.const_data_ptr(), y.const_data_ptr<int64_t>(), logp.data_ptr<float>(),
                                entropy.data_ptr<float>(), lse.data_ptr<float>(), B, T, logits.stride(0),
                                logits.stride(1), V, static_cast<float>(1.0 / temperature), ignore_index,
                                c10::cuda::getCurrentCUDAStream()),
      "logprobs_fwd");
  return {logp, entropy, lse};
}

// `grad`: shaped like logits, its dtype, vocab stride 1, any row strides (rows of a larger gradient).
void logprobs_bwd_out_cuda(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& logits,
                           const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
                           double temperature, int64_t ignore_index, at::Tensor& grad) {
  check_rows(logits, "logits");
  check_grad_out(grad, logits, "grad");
  io::check_not_partly_over(grad, logits, "grad");  // it may be logits itself (logprobs(overwrite_logits=True))
  const cuda::DType dtype = cuda_dtype(logits, "logprobs");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2), N = B * T;
  const at::Tensor y = per_row(targets, N, at::kLong, logits, "targets");
  const at::Tensor g_lp = per_row(grad_logp, N, at::kFloat, logits, "grad_logp");
  const at::Tensor g_ent = per_row(grad_entropy, N, at::kFloat, logits, "grad_entropy");
  const at::Tensor lse_c = per_row(lse, N, at::kFloat, logits, "lse");
  const at::Tensor ent_c = per_row(entropy, N, at::kFloat, logits, "entropy");
  check_cuda_error(
      cuda::launch_logprobs_bwd(dtype, grad.data_ptr(), logits.const_data_ptr(), y.const_data_ptr<int64_t>(),
                                g_lp.const_data_ptr<float>(), g_ent.const_data_ptr<float>(),
                                lse_c.const_data_ptr<float>(), ent_c.const_data_ptr<float>(), B, T, logits.stride(0),
                                logits.stride(1), grad.stride(0), grad.stride(1), V,
                                static_cast<float>(1.0 / temperature), ignore_index,
                                c10::cuda::getCurrentCUDAStream()),
      "logprobs_bwd");
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& logits,
                             const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
                             double temperature, int64_t ignore_index) {
  check_rows(logits, "logits");
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  logprobs_bwd_out_cuda(grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index, grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_divergence_fwd_cuda(const at::Tensor& logits,
                                                                       const at::Tensor& ref_logits,
                                                                       double temperature) {
  const auto [x, r] = io::kl_inputs(logits, ref_logits, at::kCUDA);
  const cuda::DType dtype = cuda_dtype(x, "kl_divergence");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({B, T}, opts), lse_z = at::empty({B, T}, opts), lse_r = at::empty({B, T}, opts);
  check_cuda_error(cuda::launch_kl_fwd(dtype, x.const_data_ptr(), r.const_data_ptr(), kl.data_ptr<float>(),
                                       lse_z.data_ptr<float>(), lse_r.data_ptr<float>(), B, T, x.stride(0),
                                       x.stride(1), r.stride(0), r.stride(1), V,
                                       static_cast<float>(1.0 / temperature), c10::cuda::getCurrentCUDAStream()),
                   "kl_divergence_fwd");
  return {kl, lse_z, lse_r};
}

std::tuple<at::Tensor, at::Tensor> kl_divergence_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                          const at::Tensor& ref_logits, const at::Tensor& kl,
                                                          const at::Tensor& lse_z, const at::Tensor& lse_r,
                                                          double temperature, bool need_ref_grad,
                                                          const std::optional<at::Tensor>& grad_out,
                                                          const std::optional<at::Tensor>& ref_grad_out) {
  const auto [x, r] = io::kl_inputs(logits, ref_logits, at::kCUDA);
  const cuda::DType dtype = cuda_dtype(x, "kl_divergence");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2), N = B * T;
  const at::Tensor g = per_row(grad, N, at::kFloat, x, "grad");
  const at::Tensor kl_c = per_row(kl, N, at::kFloat, x, "kl");
  const at::Tensor lz = per_row(lse_z, N, at::kFloat, x, "lse_z");
  const at::Tensor lr = per_row(lse_r, N, at::kFloat, x, "lse_r");
  // With grad_out / ref_grad_out (shaped like the inputs, their dtypes, any row strides) the kernel
  // writes there directly when the dtypes match the computed one (else through a float32 buffer)
  // and empty tensors come back in their place.
  io::KlGrads out = io::kl_grad_buffers(logits, ref_logits, x, r, need_ref_grad, grad_out, ref_grad_out);
  at::Tensor &dz = out.dz, &dr = out.dr;
  check_cuda_error(cuda::launch_kl_bwd(dtype, dz.data_ptr(), need_ref_grad ? dr.data_ptr() : nullptr,
                                       x.const_data_ptr(), r.const_data_ptr(), g.const_data_ptr<float>(),
                                       kl_c.const_data_ptr<float>(), lz.const_data_ptr<float>(),
                                       lr.const_data_ptr<float>(), B, T, x.stride(0), x.stride(1), r.stride(0),
                                       r.stride(1), dz.stride(0), dz.stride(1), need_ref_grad ? dr.stride(0) : 0,
                                       need_ref_grad ? dr.stride(1) : 0, V, static_cast<float>(1.0 / temperature),
                                       c10::cuda::getCurrentCUDAStream()),
                   "kl_divergence_bwd");
  return io::kl_grad_result(out, logits, ref_logits, need_ref_grad, grad_out, ref_grad_out);
}

const char* ppo_path_name(cuda::PpoPath path) {
  switch (path) {
    case cuda::PpoPath::kGlobal:
      return "global";
    case cuda::PpoPath::kShared:
      return "shared";
    case cuda::PpoPath::kCluster:
      return "cluster";
    case cuda::PpoPath::kL2:
      return "l2";
    case cuda::PpoPath::kPipe:
      return "pipe";
    case cuda::PpoPath::kForwardOnly:
      return "forward";
    default:
      return "auto";
  }
}

// The paths a caller may ask plan_ppo for (kForwardOnly is the plan's own answer to with_grad = false).
void check_ppo_request(int64_t path) {
  TORCH_CHECK((path >= 0 && path <= 3) || path == static_cast<int64_t>(cuda::PpoPath::kL2) ||
                  path == static_cast<int64_t>(cuda::PpoPath::kPipe),
              "ppo path must be 0 (auto), 1 (global), 2 (shared), 3 (cluster), 5 (l2) or 6 (pipe), got ", path);
}

cuda::PpoPlan ppo_plan_for(const at::Tensor& logits, int64_t path, bool with_grad) {
  check_ppo_request(path);
  const cuda::PpoPlan plan = cuda::plan_ppo(cuda_dtype(logits, "ppo_loss"), logits.size(-1),
                                            static_cast<cuda::PpoPath>(path), with_grad, logits.get_device());
  TORCH_CHECK(plan.cluster > 0, "the fused ppo_loss path '", ppo_path_name(static_cast<cuda::PpoPath>(path)),
              "' cannot run for V = ", logits.size(-1), " ", logits.scalar_type(),
              " on this GPU (shared memory too small, or no sm_90 thread-block clusters)");
  return plan;
}

// kl_estimator: 1 = k1, 2 = k2, 3 = k3. With weights: also grad = weights·∂term/∂logits.
// `probe` (benchmarks/probe_ppo.py only): run the kernel's probe instantiation with it.
std::vector<at::Tensor> ppo_fwd_impl(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& old_logp,
                                     const at::Tensor& advantages, const std::optional<at::Tensor>& ref_logp,
                                     const std::optional<at::Tensor>& weights, double temperature,
                                     int64_t ignore_index, double kl_coef, int64_t kl_estimator, double entropy_coef,
                                     double clip_low, double clip_high, std::optional<double> dual_clip,
                                     int64_t path, const std::optional<at::Tensor>& grad_out,
                                     const cuda::PpoProbe* probe) {
  check_rows(logits, "logits");
  TORCH_CHECK(kl_estimator >= 1 && kl_estimator <= 3, "kl_estimator must be 1, 2 or 3, got ", kl_estimator);
  const cuda::DType dtype = cuda_dtype(logits, "ppo_loss");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2), N = B * T;
  const at::Tensor y = per_row(targets, N, at::kLong, logits, "targets");
  const at::Tensor old = per_row(old_logp, N, at::kFloat, logits, "old_logp");
  const at::Tensor adv = per_row(advantages, N, at::kFloat, logits, "advantages");
  const at::Tensor ref = ref_logp.has_value() ? per_row(*ref_logp, N, at::kFloat, logits, "ref_logp") : at::Tensor();
  const bool with_grad = weights.has_value();
  const at::Tensor w = with_grad ? per_row(*weights, N, at::kFloat, logits, "weights") : at::Tensor();
  auto opts = logits.options().dtype(at::kFloat);
  std::vector<at::Tensor> out;
  for (int i = 0; i < 6; ++i) out.push_back(at::empty({B, T}, opts));
  // grad_out (shaped like logits, its dtype, any row strides): dlogits is written there and an
  // empty tensor comes back in its place.
  TORCH_CHECK(!grad_out.has_value() || with_grad, "grad_out needs weights");
  if (grad_out.has_value()) check_grad_out(*grad_out, logits, "grad_out");
  at::Tensor grad = grad_out.has_value() ? *grad_out
                    : with_grad          ? at::empty({B, T, V}, logits.options())
                                         : at::empty({0}, logits.options());
  const auto result_grad = [&]() { return grad_out.has_value() ? at::empty({0}, logits.options()) : grad; };
  if (N == 0) {
    out.push_back(result_grad());
    return out;
  }
  const cuda::PpoPlan plan = ppo_plan_for(logits, with_grad ? path : 0, with_grad);
  // grad_out may be logits itself (ppo_loss(..., overwrite_logits=True)): every path reads each column of a row
  // before it writes that column's gradient (write_row_range)
  if (grad_out.has_value()) io::check_not_partly_over(*grad_out, logits, "grad_out");
  cuda::PpoParams params{};
  params.inv_t = static_cast<float>(1.0 / temperature);
  params.ignore_index = ignore_index;
  params.kl_coef = static_cast<float>(kl_coef);
  params.entropy_coef = static_cast<float>(entropy_coef);
  params.clip_low = static_cast<float>(clip_low);
  params.clip_high = static_cast<float>(clip_high);
  params.has_dual = dual_clip.has_value();
  params.dual_clip = static_cast<float>(dual_clip.value_or(0.0));
  params.has_ref = ref.defined();
  params.kl_estimator = static_cast<int>(kl_estimator);
  check_cuda_error(
      cuda::launch_ppo_fwd(dtype, plan, logits.const_data_ptr(), y.const_data_ptr<int64_t>(),
                           old.const_data_ptr<float>(), adv.const_data_ptr<float>(),
                           ref.defined() ? ref.const_data_ptr<float>() : nullptr,
                           with_grad ? w.const_data_ptr<float>() : nullptr, out[0].data_ptr<float>(),
                           out[1].data_ptr<float>(), out[2].data_ptr<float>(), out[3].data_ptr<float>(),
                           out[4].data_ptr<float>(), out[5].data_ptr<float>(), with_grad ? grad.data_ptr() : nullptr,
                           B, T, logits.stride(0), logits.stride(1), with_grad ? grad.stride(0) : 0,
                           with_grad ? grad.stride(1) : 0, V, params, c10::cuda::getCurrentCUDAStream(), probe),
      "ppo_fwd");
  out.push_back(result_grad());
  return out;
}

std::vector<at::Tensor> ppo_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& old_logp,
                                     const at::Tensor& advantages, const std::optional<at::Tensor>& ref_logp,
                                     const std::optional<at::Tensor>& weights, double temperature,
                                     int64_t ignore_index, double kl_coef, int64_t kl_estimator, double entropy_coef,
                                     double clip_low, double clip_high, std::optional<double> dual_clip,
                                     int64_t path, const std::optional<at::Tensor>& grad_out) {
  return ppo_fwd_impl(logits, targets, old_logp, advantages, ref_logp, weights, temperature, ignore_index, kl_coef,
                      kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, path, grad_out, nullptr);
}

// The fused PPO training step (with_grad; without it the same loss and means over the forward-only kernel):
// ppo_fwd with the weights of `loss_agg` (0 token-mean, 1 seq-mean-token-mean, 2 seq-mean-token-sum,
// 3 seq-mean-token-sum-norm) computed from `mask` on the GPU before the kernel, and the loss
// and the logged means after it (csrc/cuda/ppo_aggregate.cuh): ppo_fwd's seven outputs, then the loss (a float32
// scalar) and [clip_frac, approx_kl]. Three launches, where the same in PyTorch took 13 to 30 small kernels around
// the fused one, each a Python call on the host.
std::vector<at::Tensor> ppo_fwd_loss_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                          const at::Tensor& old_logp, const at::Tensor& advantages,
                                          const std::optional<at::Tensor>& ref_logp, const at::Tensor& mask,
                                          int64_t loss_agg, double temperature, int64_t ignore_index, double kl_coef,
                                          int64_t kl_estimator, double entropy_coef, double clip_low,
                                          double clip_high, std::optional<double> dual_clip, int64_t path,
                                          const std::optional<at::Tensor>& grad_out, bool with_grad) {
  check_rows(logits, "logits");
  TORCH_CHECK(with_grad || !grad_out.has_value(), "ppo_fwd_loss: grad_out needs with_grad");
  TORCH_CHECK(loss_agg >= 0 && loss_agg <= 3,
              "loss_agg must be 0 (token-mean), 1 (seq-mean-token-mean), 2 (seq-mean-token-sum) or 3 "
              "(seq-mean-token-sum-norm), got ", loss_agg);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), N = B * T;
  const at::Tensor m = per_row(mask, N, at::kFloat, logits, "mask");
  const at::Tensor old = per_row(old_logp, N, at::kFloat, logits, "old_logp");
  const auto opts = logits.options().dtype(at::kFloat);
  const at::Tensor weights = at::empty({B, T}, opts), total = at::empty({1}, opts);
  const at::Tensor loss = at::empty({}, opts), means = at::empty({2}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_cuda_error(cuda::launch_loss_weights(m.const_data_ptr<float>(), weights.data_ptr<float>(),
                                             total.data_ptr<float>(), B, T, static_cast<cuda::LossAgg>(loss_agg),
                                             stream),
                   "ppo_fwd_loss (weights)");
  // without with_grad the kernel takes no weights: its forward-only form (one read of the logits, no dlogits);
  // the weights still make the loss
  std::vector<at::Tensor> out =
      ppo_fwd_impl(logits, targets, old, advantages, ref_logp, with_grad ? std::optional<at::Tensor>(weights)
                                                                          : std::nullopt,
                   temperature, ignore_index, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip,
                   path, grad_out, nullptr);
  // out: term, logp, entropy, kl, clipped, lse ([B, T] float32, contiguous), grad
  check_cuda_error(cuda::launch_loss_sums(weights.const_data_ptr<float>(), m.const_data_ptr<float>(),
                                          total.const_data_ptr<float>(), out[0].const_data_ptr<float>(),
                                          out[4].const_data_ptr<float>(), out[1].const_data_ptr<float>(),
                                          old.const_data_ptr<float>(), loss.data_ptr<float>(),
                                          means.data_ptr<float>(), N, stream),
                   "ppo_fwd_loss (sums)");
  out.push_back(loss);
  out.push_back(means);
  return out;
}

// ppo_fwd through the kernel's probe (csrc/cuda/ppo_probe.cuh): `stamps` is an int64 CUDA tensor of
// [CTAs, kProbeSlots] (CTAs = rows x the plan's cluster) that thread 0 of each CTA fills, or None; `skip` the
// stages to leave out (ProbeSkip bits; the results are then wrong, for timing only) or the alternatives to try.
std::vector<at::Tensor> ppo_fwd_probe(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& old_logp,
                                      const at::Tensor& advantages, const std::optional<at::Tensor>& ref_logp,
                                      const std::optional<at::Tensor>& weights, double temperature,
                                      int64_t ignore_index, double kl_coef, int64_t kl_estimator,
                                      double entropy_coef, double clip_low, double clip_high,
                                      std::optional<double> dual_clip, int64_t path,
                                      const std::optional<at::Tensor>& stamps, int64_t skip) {
  TORCH_CHECK(logits.is_cuda(), "ppo_fwd_probe needs CUDA tensors, got logits on ", logits.device());
  check_rows(logits, "logits");
  const unsigned known = cuda::kProbeNoExchange | cuda::kProbeNoRowTail | cuda::kProbeNoSweep2 |
                         cuda::kProbeCopySweep2 | cuda::kProbePushExchange | cuda::kProbeRelaxedArrive;
  TORCH_CHECK(skip >= 0 && (static_cast<uint64_t>(skip) & ~static_cast<uint64_t>(known)) == 0,
              "skip must be a combination of the ProbeSkip bits 1, 2, 4, 8, 16 and 32, got ", skip);
  cuda::PpoProbe probe{nullptr, static_cast<unsigned>(skip)};
  const bool with_grad = weights.has_value();
  const c10::cuda::CUDAGuard guard(logits.device());
  const cuda::PpoPlan plan = ppo_plan_for(logits, with_grad ? path : 0, with_grad);
  TORCH_CHECK(plan.path != cuda::PpoPath::kPipe, "the probe stamps one row per CTA: the 'pipe' path has no probe");
  TORCH_CHECK(!(skip & cuda::kProbeCopySweep2) || plan.path == cuda::PpoPath::kCluster,
              "skip bit 8 (copy in sweep 2) exists on the 'cluster' path only, this plan is '",
              ppo_path_name(plan.path), "'");
  TORCH_CHECK(!(skip & cuda::kProbePushExchange) ||
                  (plan.path == cuda::PpoPath::kCluster && plan.cluster <= cuda::kProbeMaxCluster),
              "skip bit 16 (push exchange) exists on the 'cluster' path of at most ", cuda::kProbeMaxCluster,
              " CTAs only, this plan is '", ppo_path_name(plan.path), "' over ", plan.cluster);
  TORCH_CHECK(!((skip & cuda::kProbePushExchange) && (skip & cuda::kProbeNoExchange)),
              "skip bits 1 (no exchange) and 16 (push exchange) exclude each other");
  TORCH_CHECK(!(skip & cuda::kProbeRelaxedArrive) || plan.path == cuda::PpoPath::kCluster,
              "skip bit 32 (relaxed closing arrive) exists on the 'cluster' path only, this plan is '",
              ppo_path_name(plan.path), "'");
  TORCH_CHECK(!((skip & cuda::kProbeRelaxedArrive) && (skip & (cuda::kProbeNoExchange | cuda::kProbePushExchange))),
              "skip bit 32 (relaxed closing arrive) excludes bits 1 (no exchange) and 16 (push exchange), which "
              "have no closing arrive");
  if (stamps.has_value()) {
    const int64_t ctas = logits.size(0) * logits.size(1) * plan.cluster;
    TORCH_CHECK(stamps->device() == logits.device() && stamps->scalar_type() == at::kLong &&
                    stamps->is_contiguous() && stamps->dim() == 2 && stamps->size(0) == ctas &&
                    stamps->size(1) == cuda::kProbeSlots,
                "stamps must be a contiguous int64 tensor of [", ctas, ", ", static_cast<int>(cuda::kProbeSlots),
                "] on ", logits.device(), " (one row per CTA: rows x cluster ", plan.cluster, "), got ",
                stamps->scalar_type(), " ", stamps->sizes(), " on ", stamps->device());
    probe.stamps = reinterpret_cast<unsigned long long*>(stamps->data_ptr<int64_t>());
  }
  return ppo_fwd_impl(logits, targets, old_logp, advantages, ref_logp, weights, temperature, ignore_index, kl_coef,
                      kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, path, std::nullopt, &probe);
}

void scale_unless_one_cuda(at::Tensor& x, const at::Tensor& scale) {
  TORCH_CHECK(x.is_contiguous(), "scale_unless_one_ needs a contiguous tensor");
  TORCH_CHECK(scale.numel() == 1 && scale.device() == x.device(), "scale must be one element on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  check_cuda_error(cuda::launch_scale_unless_one(cuda_dtype(x, "scale"), x.data_ptr(), x.numel(),
                                                 s.const_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
                   "scale_unless_one_");
}

// The target check's range (ops/_deferred_checks.py: PendingRange): [min, max] of `targets` with ignore_index
// counted as 0, computed by one kernel and copied without blocking into `host` (2 int64 in pinned memory).
void target_range_to_host_cuda(const at::Tensor& targets, int64_t ignore_index, at::Tensor& host) {
  TORCH_CHECK(host.numel() == 2 && host.scalar_type() == at::kLong && host.device().is_cpu() && host.is_contiguous(),
              "host must be 2 contiguous int64 on the CPU (pinned), got ", host.sizes(), " ", host.scalar_type(),
              " on ", host.device());
  const c10::cuda::CUDAGuard guard(targets.device());
  const at::Tensor y = targets.to(at::kLong).contiguous();
  const at::Tensor range = at::empty({2}, y.options());
  check_cuda_error(cuda::launch_target_range(y.const_data_ptr<int64_t>(), y.numel(), ignore_index,
                                             range.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
                   "target_range_to_host");
  host.copy_(range, /*non_blocking=*/true);
}

}  // namespace
#endif

}  // namespace rlhf_kernels

TORCH_LIBRARY(rlhf_kernels_C, m) {
  m.def("logprobs_fwd(Tensor logits, Tensor targets, float temperature, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor targets, Tensor lse, "
      "Tensor entropy, float temperature, int ignore_index) -> Tensor");
  // The same gradient written into `grad` (shaped like logits, vocab stride 1, any row strides).
  m.def(
      "logprobs_bwd_out(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor targets, Tensor lse, "
      "Tensor entropy, float temperature, int ignore_index, Tensor(a!) grad) -> ()");
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  // kl_divergence: the cpu and cuda backends; ppo_fwd, ppo_fwd_loss, scale_unless_one_ and target_range_to_host:
  // CUDA only.
  m.def("kl_divergence_fwd(Tensor logits, Tensor ref_logits, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "kl_divergence_bwd(Tensor grad, Tensor logits, Tensor ref_logits, Tensor kl, Tensor lse_z, Tensor lse_r, "
      "float temperature, bool need_ref_grad, Tensor(a!)? grad_out=None, Tensor(b!)? ref_grad_out=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "ppo_fwd(Tensor logits, Tensor targets, Tensor old_logp, Tensor advantages, Tensor? ref_logp, "
      "Tensor? weights, float temperature, int ignore_index, float kl_coef, int kl_estimator, float entropy_coef, "
      "float clip_low, float clip_high, float? dual_clip, int path, Tensor(a!)? grad_out=None) -> Tensor[]");
  m.def(
      "ppo_fwd_loss(Tensor logits, Tensor targets, Tensor old_logp, Tensor advantages, Tensor? ref_logp, "
      "Tensor mask, int loss_agg, float temperature, int ignore_index, float kl_coef, int kl_estimator, "
      "float entropy_coef, float clip_low, float clip_high, float? dual_clip, int path, Tensor(a!)? grad_out=None, "
      "bool with_grad=True) -> Tensor[]");
  m.def("scale_unless_one_(Tensor(a!) x, Tensor scale) -> ()");
  m.def("target_range_to_host(Tensor targets, int ignore_index, Tensor(a!) host) -> ()");
}

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CPU, m) {
  m.impl("logprobs_fwd", &rlhf_kernels::cpu::logprobs_fwd);
  m.impl("logprobs_bwd", &rlhf_kernels::cpu::logprobs_bwd);
  m.impl("logprobs_bwd_out", &rlhf_kernels::cpu::logprobs_bwd_out);
  m.impl("gae", &rlhf_kernels::cpu::gae);
  m.impl("kl_divergence_fwd", &rlhf_kernels::cpu::kl_divergence_fwd);
  m.impl("kl_divergence_bwd", &rlhf_kernels::cpu::kl_divergence_bwd);
}

#ifdef RLHF_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(rlhf_kernels_C, CUDA, m) {
  m.impl("gae", &rlhf_kernels::gae_cuda);
  m.impl("logprobs_fwd", &rlhf_kernels::logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &rlhf_kernels::logprobs_bwd_cuda);
  m.impl("logprobs_bwd_out", &rlhf_kernels::logprobs_bwd_out_cuda);
  m.impl("kl_divergence_fwd", &rlhf_kernels::kl_divergence_fwd_cuda);
  m.impl("kl_divergence_bwd", &rlhf_kernels::kl_divergence_bwd_cuda);
  m.impl("ppo_fwd", &rlhf_kernels::ppo_fwd_cuda);
  m.impl("ppo_fwd_loss", &rlhf_kernels::ppo_fwd_loss_cuda);
  m.impl("scale_unless_one_", &rlhf_kernels::scale_unless_one_cuda);
  m.impl("target_range_to_host", &rlhf_kernels::target_range_to_host_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "rlhf_kernels compiled kernels (ops are registered under torch.ops.rlhf_kernels_C)";
  module.def("compiled_with_cuda", [] {
#ifdef RLHF_KERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  module.def("cuda_arch_list", [] { return std::string(RLHF_KERNELS_CUDA_ARCHS); });
  module.def("cpu_capability", [] { return std::string(RLHF_KERNELS_CPU_CAPABILITY); });
  // The kernels of the cuda backend, per op family (reported by `rlhf-kernels info`).
  module.def("cuda_kernels", [] {
    std::vector<std::pair<std::string, std::string>> kernels;
#ifdef RLHF_KERNELS_WITH_CUDA
    kernels = {{"logprobs", "logprobs_fwd_kernel, logprobs_bwd_kernel"},
               {"kl_divergence", "kl_fwd_kernel, kl_bwd_kernel"},
               {"ppo_loss", "ppo_fwd_kernel (forward, or forward + dlogits: global / shared / cluster), "
                            "loss_weights_kernel, loss_sums_kernel, logprobs_bwd_kernel, scale_unless_one_kernel"},
               {"gae", "gae_fwd_kernel"}};
#endif
    return kernels;
  });
  // Which path the fused ppo_loss forward+gradient takes for (V, dtype) on `device`:
  // (path, CTAs per row, threads, shared bytes per CTA); path "none" when a forced one cannot run.
  module.def("ppo_plan", [](int64_t vocab, const std::string& dtype, int64_t path, bool with_grad, int64_t device) {
#ifdef RLHF_KERNELS_WITH_CUDA
    rlhf_kernels::check_ppo_request(path);
    const rlhf_kernels::cuda::DType d = dtype == "float32"   ? rlhf_kernels::cuda::DType::kFloat32
                                        : dtype == "float16" ? rlhf_kernels::cuda::DType::kFloat16
                                                             : rlhf_kernels::cuda::DType::kBFloat16;
    const auto plan = rlhf_kernels::cuda::plan_ppo(d, vocab, static_cast<rlhf_kernels::cuda::PpoPath>(path), with_grad,
                                                   static_cast<int>(device));
    return std::make_tuple(std::string(plan.cluster > 0 ? rlhf_kernels::ppo_path_name(plan.path) : "none"),
                           plan.cluster, plan.threads, plan.smem_bytes);
#else
    (void)vocab; (void)dtype; (void)path; (void)with_grad; (void)device;
    TORCH_CHECK(false, "the extension was built without CUDA kernels");
    return std::make_tuple(std::string(), 0, 0, int64_t(0));
#endif
  });
  // The fused PPO kernel's probe (benchmarks/probe_ppo.py): ppo_fwd's arguments (no grad_out), then the stamps
  // tensor or None and the skipped stages; the probe's slot and skip constants come with it.
#ifdef RLHF_KERNELS_WITH_CUDA
  module.def("ppo_fwd_probe", &rlhf_kernels::ppo_fwd_probe, pybind11::arg("logits"), pybind11::arg("targets"),
             pybind11::arg("old_logp"), pybind11::arg("advantages"), pybind11::arg("ref_logp"),
             pybind11::arg("weights"), pybind11::arg("temperature"), pybind11::arg("ignore_index"),
             pybind11::arg("kl_coef"), pybind11::arg("kl_estimator"), pybind11::arg("entropy_coef"),
             pybind11::arg("clip_low"), pybind11::arg("clip_high"), pybind11::arg("dual_clip"), pybind11::arg("path"),
             pybind11::arg("stamps"), pybind11::arg("skip"));
  module.attr("PROBE_SLOTS") = static_cast<int>(rlhf_kernels::cuda::kProbeSlots);
#endif
  // benchmarks/exception_probe.py: a throw from this library's own frames with no c10 machinery (kind 0: a plain
  // std::runtime_error, which needs only the unwinder) or through TORCH_CHECK (kind 1: c10::Error, which also
  // captures a backtrace when it is built), to tell where a crashing throw breaks (H200 runs 5 and 6).
  module.def("throw_for_diagnosis", [](int64_t kind) {
    if (kind == 0) throw std::runtime_error("throw_for_diagnosis: plain C++ exception");
    TORCH_CHECK(kind != 1, "throw_for_diagnosis: TORCH_CHECK");
    return kind;
  });
}
