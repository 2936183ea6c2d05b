// Host-side launchers of the CUDA kernels: plain pointers and sizes only,
// so the .cu files need no torch headers and compile in seconds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace rlhf_kernels {
namespace cuda {

// GAE reverse scan, one thread per sequence; all arrays [B, T] contiguous fp32.
cudaError_t launch_gae_fp32(const float* rewards, const float* values, const float* mask, float* advantages,
                            float* returns, int64_t batch, int64_t seq_len, float gamma, float lam,
                            cudaStream_t stream);

// Element type of the logits (the row kernels are compiled for these three).
enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rows are addressed as a [B, T, V] view: row r = b·T + t starts at b·stride_b + t·stride_t
// (elements), the vocabulary has stride 1. Per-row arrays are contiguous [B·T] float32.

// logprobs forward: (logp, entropy, lse) per row. One CTA per row.
cudaError_t launch_logprobs_fwd(DType dtype, const void* logits, const int64_t* targets, float* logp, float* entropy,
                                float* lse, int64_t rows_outer, int64_t rows_inner, int64_t stride_b,
                                int64_t stride_t, int64_t vocab, float inv_t, int64_t ignore_index,
                                cudaStream_t stream);

// logprobs backward into grad, a [B, T, V] tensor of the logits' dtype with vocab stride 1 and
// row (b, t) at b·grad_stride_b + t·grad_stride_t (contiguous: T·V and V; rows of a larger
// gradient, e.g. the [B, T+1, V] logits' one, otherwise).
cudaError_t launch_logprobs_bwd(DType dtype, void* grad, const void* logits, const int64_t* targets,
                                const float* grad_logp, const float* grad_entropy, const float* lse,
                                const float* entropy, int64_t rows_outer, int64_t rows_inner, int64_t stride_b,
                                int64_t stride_t, int64_t grad_stride_b, int64_t grad_stride_t, int64_t vocab,
                                float inv_t, int64_t ignore_index, cudaStream_t stream);

// Exact KL(softmax(z) || softmax(r)) per row, with lse of both rows. Both inputs of one dtype.
cudaError_t launch_kl_fwd(DType dtype, const void* logits, const void* ref_logits, float* kl, float* lse_z,
                          float* lse_r, int64_t rows_outer, int64_t rows_inner, int64_t stride_b, int64_t stride_t,
                          int64_t ref_stride_b, int64_t ref_stride_t, int64_t vocab, float inv_t,
                          cudaStream_t stream);

// KL backward: grad_z (and grad_r when not null), [B, T, V] in the inputs' dtype, vocab stride 1,
// rows at the given strides (as launch_logprobs_bwd).
cudaError_t launch_kl_bwd(DType dtype, void* grad_z, void* grad_r, const void* logits, const void* ref_logits,
                          const float* grad, const float* kl, const float* lse_z, const float* lse_r,
                          int64_t rows_outer, int64_t rows_inner, int64_t stride_b, int64_t stride_t,
                          int64_t ref_stride_b, int64_t ref_stride_t, int64_t gz_stride_b, int64_t gz_stride_t,
                          int64_t gr_stride_b, int64_t gr_stride_t, int64_t vocab, float inv_t,
                          cudaStream_t stream);

// Scalars of the fused PPO term (see ppo.cu).
struct PpoParams {
  float inv_t;
  int64_t ignore_index;
  float kl_coef, entropy_coef, clip_low, clip_high, dual_clip;
  bool has_ref, has_dual;
  int kl_estimator;  // 1: k1, 2: k2, 3: k3
};

// How the fused PPO forward that also writes the gradient keeps a row between its two sweeps.
enum class PpoPath {
  kAuto = 0,
  kGlobal = 1,   // re-read the row from global memory (L2 / HBM): any GPU, any V
  kShared = 2,   // the whole row stays in one CTA's shared memory
  kCluster = 3,  // sm_90: the row is split over a thread-block cluster, each slice in its CTA's
                 // shared memory, the softmax statistics exchanged through distributed shared memory
  kForwardOnly = 4,  // no gradient: one sweep
  kL2 = 5,       // re-read the row as kGlobal, with fewer CTAs per SM (more of the re-read hits L2) and the
                 // second sweep walking each thread's vectors backwards (the lines read last first)
  kPipe = 6,     // sm_90: kCluster's slices in a persistent kernel, one CTA per SM, two slice buffers: the
                 // next row's slice is loaded while this row's gradient is written
};

struct PpoPlan {
  PpoPath path;
  int cluster;  // CTAs per row
  int threads;
  int64_t smem_bytes;  // dynamic shared memory per CTA
};

// The path the fused kernel takes for this dtype / V on `device` (kAuto picks; a forced path
// that cannot run here comes back as kGlobal with cluster = 0 so callers can say why).
PpoPlan plan_ppo(DType dtype, int64_t vocab, PpoPath requested, bool with_grad, int device);

// The fused PPO kernel's probe (ppo_probe.cuh; benchmarks/probe_ppo.py): `stamps` (may be null) holds
// kProbeSlots unsigned 64-bit values per CTA of the launch (rows x plan.cluster), written by thread 0:
enum ProbeSlot : int {
  kProbeStartNs = 0,  // %globaltimer at the CTA's start (ns)
  kProbeStart = 1,    // clock64() at the start; the phase stamps below are clock64() too
  kProbeSweep1 = 2,   // sweep 1 done and block-reduced (the slice loaded, its statistics known)
  kProbeSynced = 3,   // the cluster barrier passed (every peer's statistics readable)
  kProbeMerged = 4,   // the cluster's statistics merged
  kProbeRow = 5,      // the row's term written and sweep 2's coefficients visible to the CTA
  kProbeSweep2 = 6,   // sweep 2 written by every thread
  kProbeExit = 7,     // the closing cluster barrier passed
  kProbeEndNs = 8,    // %globaltimer at the end (ns)
  kProbeSm = 9,       // the SM the CTA ran on
  kProbeSlots = 10,
};
// `skip`: stages left out, for timing only (the results are then wrong), and alternatives to try (results unchanged).
enum ProbeSkip : unsigned {
  kProbeNoExchange = 1,   // the cluster path does not exchange statistics (no cluster barrier)
  kProbeNoRowTail = 2,    // thread 0 does not compute the row's term (sweep 2 gets zero coefficients)
  kProbeNoSweep2 = 4,     // no gradient is written
  kProbeCopySweep2 = 8,   // sweep 2 writes the logits unchanged instead of their gradient
  kProbePushExchange = 16,  // an alternative, same results: each CTA pushes its statistics into its peers' shared
                            // memory before the cluster barrier and merges them locally; no closing barrier
  kProbeRelaxedArrive = 32,  // an alternative, same results: the arrive after the merge without its release fence
                             // (MEMBAR.ALL.GPU on sm_90): each lane consumed the peer's values it read before arriving
};
constexpr int kProbeMaxCluster = 8;  // the push exchange's slots per CTA
struct PpoProbe {
  unsigned long long* stamps;
  unsigned skip;
};

// Fused PPO per-token term: (term, logp, entropy, kl, clipped, lse) per row; when `weights`
// is not null, also grad = weight_row·∂term/∂logits ([B, T, V], logits' dtype, vocab stride 1,
// rows at the given strides as in launch_logprobs_bwd). ref_logp may be null (has_ref = false).
// With `probe` (not for kPipe) the kernel's probe instantiation runs instead (ppo_probe.cuh).
cudaError_t launch_ppo_fwd(DType dtype, const PpoPlan& plan, const void* logits, const int64_t* targets,
                           const float* old_logp, const float* advantages, const float* ref_logp,
                           const float* weights, float* term, float* logp, float* entropy, float* kl, float* clipped,
                           float* lse, void* grad, int64_t rows_outer, int64_t rows_inner, int64_t stride_b,
                           int64_t stride_t, int64_t grad_stride_b, int64_t grad_stride_t, int64_t vocab,
                           const PpoParams& params, cudaStream_t stream, const PpoProbe* probe = nullptr);

// ppo_loss's loss_agg (the order of reference.LOSS_AGG_MODES); the weights and sums in ppo_aggregate.cuh.
enum class LossAgg : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };

// The fused step's per-token weights w = ∂loss/∂term ([rows, cols] float32, contiguous) of `agg` from the mask
// (the same layout), and total = Σ mask (one float), on one CTA.
cudaError_t launch_loss_weights(const float* mask, float* weights, float* total, int64_t rows, int64_t cols,
                                LossAgg agg, cudaStream_t stream);

// After the fused kernel: loss = Σ w·term, means = [Σ m·clipped, Σ m·½(logp - old_logp)²] / total (0 when total is
// 0), over n contiguous float32 tokens, on one CTA (the same order every call).
cudaError_t launch_loss_sums(const float* weights, const float* mask, const float* total, const float* term,
                             const float* clipped, const float* logp, const float* old_logp, float* loss,
                             float* means, int64_t n, cudaStream_t stream);

// range = [min, max] of targets[0:n] (int64, contiguous) with ignore_index counted as 0 ([0, 0] when n = 0).
cudaError_t launch_target_range(const int64_t* targets, int64_t n, int64_t ignore_index, int64_t* range,
                                cudaStream_t stream);

// x[0:n] *= *scale in place, skipped (no memory traffic) when *scale == 1 (read on the device).
cudaError_t launch_scale_unless_one(DType dtype, void* x, int64_t n, const float* scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlhf_kernels
