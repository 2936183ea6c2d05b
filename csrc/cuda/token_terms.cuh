// The per-token arithmetic of the fused PPO kernels (ppo_term.cuh): the sample KL estimators k1 / k2 / k3 and
// their derivative, and the clipped surrogate with its derivative (DESIGN.md §2; mirrors
// rlhf_kernels/triton/_common.py and triton/ppo.py). Every function here is __host__ __device__, so the CPU
// emulation (tests/cuda/row_stats_emulation.cpp) checks these very lines against the float64 oracle on machines
// without a GPU. CUDA headers only.
#pragma once

#include <cmath>
#include <cstdint>

#include "launchers.h"  // PpoParams
#include "row_stats.cuh"  // RK_HD

namespace rlhf_kernels {
namespace cuda {
namespace detail {

// ---------------------------------------------------------------- KL estimators (k1/k2/k3)

// (expm1(d) - d) / d² by its Taylor series to d^12: used for |d| < 0.5, where exp(d) - 1 - d would cancel.
RK_HD float expm1_series(float d) {
  float p = 1.f / 479001600.f;
  p = fmaf(p, d, 1.f / 39916800.f);
  p = fmaf(p, d, 1.f / 3628800.f);
  p = fmaf(p, d, 1.f / 362880.f);
  p = fmaf(p, d, 1.f / 40320.f);
  p = fmaf(p, d, 1.f / 5040.f);
  p = fmaf(p, d, 1.f / 720.f);
  p = fmaf(p, d, 1.f / 120.f);
  p = fmaf(p, d, 1.f / 24.f);
  p = fmaf(p, d, 1.f / 6.f);
  return fmaf(p, d, 0.5f);
}

// exp(d) - 1 - d without cancellation near 0, as the Triton kernels.
RK_HD float expm1_minus_x(float d) { return fabsf(d) < 0.5f ? expm1_series(d) * d * d : expf(d) - 1.f - d; }

// estimator 1: k1 = -d, 2: k2 = d²/2, 3: k3 = exp(d) - 1 - d, with d = ref - logp.
RK_HD float kl_k(float logp, float ref, int estimator) {
  const float d = ref - logp;
  return estimator == 1 ? -d : (estimator == 2 ? 0.5f * d * d : expm1_minus_x(d));
}

// ∂k/∂logp (∂k/∂ref is its negative). k3's is -expm1(d), taken as 1 - exp(d) away from 0 rather than
// -(d + expm1_minus_x(d)): that sum is -inf + inf where the reference's log-prob is -inf (d = -inf), whose limit 1
// the oracle's autograd gives.
RK_HD float kl_k_dlogp(float logp, float ref, int estimator) {
  const float d = ref - logp;
  if (estimator == 1) return 1.f;
  if (estimator == 2) return -d;
  return fabsf(d) < 0.5f ? -(d + expm1_series(d) * d * d) : 1.f - expf(d);
}

// ---------------------------------------------------------------- the clipped surrogate

// pg, whether a clip was active, and ∂pg/∂logp for one token (see _ppo_pg in triton/ppo.py).
struct PolicyGrad {
  float pg, dpg;
  bool clipped;
};

RK_HD PolicyGrad ppo_pg(float logp, float old, float adv, const PpoParams& p) {
  const float raw = logp - old;
  const float log_ratio = raw < -20.f ? -20.f : (raw > 20.f ? 20.f : raw);  // NaN stays NaN
  const bool in_lr = raw >= -20.f && raw <= 20.f;
  const float ratio = expf(log_ratio);
  const float lo = 1.f - p.clip_low, hi = 1.f + p.clip_high;
  const float ratio_c = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const float pg_u = -adv * ratio, pg_c = -adv * ratio_c;
  PolicyGrad out;
  out.clipped = pg_c > pg_u;
  out.pg = out.clipped ? pg_c : pg_u;
  float dpg = out.clipped ? 0.f : -adv;  // ties (ratio inside the range) take the unclipped derivative
  if (p.has_dual) {
    const float pg_d = -adv * p.dual_clip;
    const bool neg = adv < 0.f;
    const bool use_dual = neg && pg_d < out.pg;
    dpg = (neg && out.pg == pg_d) ? 0.5f * dpg : (use_dual ? 0.f : dpg);
    out.pg = use_dual ? pg_d : out.pg;
    out.clipped = out.clipped || use_dual;
  }
  out.dpg = in_lr ? dpg * ratio : 0.f;
  return out;
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
