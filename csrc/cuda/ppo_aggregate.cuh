// The loss aggregation of the fused PPO step on the GPU (ppo_aggregate.cu): the per-token weights
// w = ∂loss/∂term of ppo_loss's `loss_agg` before the fused kernel, and the loss and the logged means after it.
// Host and device code, so the CPU emulation (tests/cuda/row_stats_emulation.cpp) runs the same arithmetic.
//
// Every loss_agg is linear in the per-token term (rlhf_kernels/ops/ppo.py: aggregation_weights), so
//   loss = Σ w·term,   with, for mask m[B, T],
//   token-mean                w = m / Σ m
//   seq-mean-token-mean       w = (m / Σ_t m) / (number of rows with Σ_t m > 0)
//   seq-mean-token-sum        w = m / B
//   seq-mean-token-sum-norm   w = m / (B·T)
// and 0 where a denominator is 0 (an empty mask gives a 0 loss and 0 gradients; a token of weight 0 adds nothing to
// the loss, even a non-finite term: strided_loss_sums). The means users log are
// token means over the mask whatever loss_agg is (reference.ppo_loss):
//   clip_frac = Σ m·clipped / Σ m,   approx_kl = Σ m·½(logp - old_logp)² / Σ m   (0 when Σ m = 0).
//
// Why on the GPU: in PyTorch these were 4-10 small kernels before the fused kernel and 7-16 after it (more for the
// per-sequence modes), each a Python call and a launch. At a PPO micro-batch (bf16 4096 x 50257 on an H200, run 5)
// the step is bound by the host's time, not the kernels'; here they are two launches from C++.
// Both kernels are one CTA: a sum over B·T floats (tens of KB at a micro-batch) in a fixed order, so the
// results are the same bits on every call.
#pragma once

#include <cstdint>

#include "launchers.h"  // LossAgg
#include "row_stats.cuh"  // RK_HD

namespace rlhf_kernels {
namespace cuda {
namespace detail {

// The three sums of the step's statistics, merged elementwise.
struct LossSums {
  float loss;     // Σ w·term
  float clipped;  // Σ m·clipped
  float half_sq;  // Σ m·½(logp - old_logp)²
};

RK_HD LossSums loss_sums_merge(const LossSums& a, const LossSums& b) {
  return {a.loss + b.loss, a.clipped + b.clipped, a.half_sq + b.half_sq};
}

// Thread `t` of `threads`: its part of Σ x[i] over i = t, t + threads, ... < n.
RK_HD float strided_sum(const float* x, int64_t n, int t, int threads) {
  float s = 0.f;
  for (int64_t i = t; i < n; i += threads) s += x[i];
  return s;
}

// Thread `t` of `threads`: its part of the step's statistics over tokens i = t, t + threads, ... < n. A token of
// weight (or mask) 0 adds exactly nothing, even where its term or log-prob is not finite (reference.masked: padding
// never turns the loss into NaN); a weight is 0 exactly where the mask is, or where its whole row or mask is empty.
RK_HD LossSums strided_loss_sums(const float* w, const float* m, const float* term, const float* clipped,
                                 const float* logp, const float* old_logp, int64_t n, int t, int threads) {
  LossSums s{0.f, 0.f, 0.f};
  for (int64_t i = t; i < n; i += threads) {
    const float d = logp[i] - old_logp[i];
    s.loss += w[i] != 0.f ? w[i] * term[i] : 0.f;
    if (m[i] != 0.f) {
      s.clipped += m[i] * clipped[i];
      s.half_sq += m[i] * (d * (0.5f * d));
    }
  }
  return s;
}

// num / den rounded to nearest, as PyTorch divides. __fdiv_rn is the same IEEE division as `/` (without
// --use_fast_math), but ptxas inlines it where `/`'s slow-path call spilled the weights kernel (8 bytes, sm_80).
RK_HD float divide(float num, float den) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(num, den);
#else
  return num / den;
#endif
}

// `num / den`, 0 where den == 0 (ops/ppo.py's _divide_or_zero).
RK_HD float divide_or_zero(float num, float den) { return den != 0.f ? divide(num, den) : 0.f; }

// The weight of a token with mask value m under `agg` other than kSeqMeanTokenMean (whose row sums the kernel
// divides by itself, per row): `total` = Σ m over all rows·cols tokens.
RK_HD float token_weight(LossAgg agg, float m, float total, int64_t rows, int64_t cols) {
  switch (agg) {
    case LossAgg::kTokenMean:
      return divide_or_zero(m, total);
    case LossAgg::kSeqMeanTokenSum:
      return divide(m, static_cast<float>(rows));
    default:  // kSeqMeanTokenSumNorm
      return divide(m, static_cast<float>(rows * cols));
  }
}

// Lane `lane` of a warp: its part of row `row`'s Σ_t m (t = lane, lane + 32, ...), before the warp's butterfly.
RK_HD float lane_row_sum(const float* m, int64_t row, int64_t cols, int lane) {
  return strided_sum(m + row * cols, cols, lane, 32);
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
