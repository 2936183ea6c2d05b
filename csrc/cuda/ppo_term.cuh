// The fused PPO per-token term and its derivative, from a row's merged softmax statistics: what thread 0 of
// each of ppo.cu's kernels computes once a row's sweep 1 is reduced (DESIGN.md §2; mirrors
// rlhf_kernels/triton/ppo.py). The formulas are in ppo.cu's header comment. CUDA headers only; every function
// here is __host__ __device__, so the CPU emulation (tests/cuda/row_stats_emulation.cpp) runs these very lines.
#pragma once

#include <cstdint>

#include "row_stats.cuh"    // RowStats, token_outputs_at, RK_HD
#include "token_terms.cuh"  // kl_k, kl_k_dlogp, ppo_pg

namespace rlhf_kernels {
namespace cuda {
namespace detail {

// The per-row inputs and outputs of the fused kernels ([rows] float32 each; ref_logp and weights may be null).
struct PpoOutputs {
  const float *old_logp, *advantages, *ref_logp, *weights;
  float *term, *logp, *entropy, *kl, *clipped, *lse;
};

// A row's scalars: old log-prob, advantage, reference log-prob (0 without one), loss weight (0 without a gradient).
struct RowScalars {
  float old, adv, ref, w;
};

RK_HD RowScalars load_row_scalars(const PpoOutputs& io, int64_t row, const PpoParams& p, bool with_grad) {
  RowScalars s{io.old_logp[row], io.advantages[row], 0.f, 0.f};
  if (p.has_ref) s.ref = io.ref_logp[row];
  if (with_grad) s.w = io.weights[row];
  return s;
}

// Thread 0's end of a row, from the merged statistics st and the target's logit xy (target_value's convention):
// writes term, logp, entropy, kl, clipped and lse when write_outputs (one CTA of a cluster), and with a gradient
// leaves sweep 2's coefficients in tok = (lse, entropy, G_logp, G_H):
// G_logp = w·∂term/∂logp (0 where w is), G_H = -w·entropy_coef.
RK_HD void finish_ppo_row(float xy, int64_t y, int64_t vocab, const RowStats& st, const RowScalars& s,
                          const PpoParams& p, const PpoOutputs& io, int64_t row, bool write_outputs, bool with_grad,
                          float* tok) {
  const TokenOutputs r = token_outputs_at(xy, y, vocab, p.inv_t, p.ignore_index, st);
  const float logp = r.logp, ent = r.entropy;
  const PolicyGrad pg = ppo_pg(logp, s.old, s.adv, p);
  float term = pg.pg - p.entropy_coef * ent;
  float kl = 0.f, dk = 0.f;  // kl stays 0 without ref_logp, even where logp is NaN
  if (p.has_ref) {
    kl = kl_k(logp, s.ref, p.kl_estimator);
    dk = kl_k_dlogp(logp, s.ref, p.kl_estimator);
    term = term + p.kl_coef * kl;
  }
  if (write_outputs) {
    io.term[row] = term;
    io.logp[row] = logp;
    io.entropy[row] = ent;
    io.kl[row] = kl;
    io.clipped[row] = pg.clipped ? 1.f : 0.f;
    io.lse[row] = r.lse;
  }
  if (with_grad) {
    float g_logp = s.w * pg.dpg;
    if (p.has_ref) g_logp += (s.w * p.kl_coef) * dk;
    if (s.w == 0.f) g_logp = 0.f;  // a masked token's row is 0, even where dpg or dk is not finite (not 0·inf)
    tok[0] = r.lse;
    tok[1] = ent;
    tok[2] = g_logp;
    tok[3] = 0.f - s.w * p.entropy_coef;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
