// The fused PPO step's loss aggregation: the per-token weights before the fused kernel and the loss and the
// logged means after it, one CTA each (formulas and why in ppo_aggregate.cuh).
#include "ppo_aggregate.cuh"
#include "row_common.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace {

using namespace detail;

// One CTA of this many threads per kernel: the sums are over B·T floats, tens of KB at a micro-batch.
constexpr int kAggregateThreads = 512;

__device__ __forceinline__ float block_sum(float x) {
  return block_reduce(x, 0.f, [](float a, float b) { return a + b; },
                      [](float a, int off) { return __shfl_xor_sync(0xffffffffu, a, off); });
}

// Σ of the warp's 32 values, lane 0's order handed to every lane (each lane's butterfly adds in its own order, and
// every lane must divide by the same bits).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return __shfl_sync(0xffffffffu, x, 0);
}

__global__ void __launch_bounds__(kAggregateThreads)
    loss_weights_kernel(const float* __restrict__ mask, float* __restrict__ weights, float* __restrict__ total_out,
                        int64_t rows, int64_t cols, LossAgg agg) {
  const int t = threadIdx.x, threads = blockDim.x;
  const int64_t n = rows * cols;
  const float total = block_sum(strided_sum(mask, n, t, threads));
  if (agg == LossAgg::kSeqMeanTokenMean) {
    // a warp per row: its Σ_t m and m / Σ_t m; then, once the non-empty rows are counted, / that count (two
    // roundings, as PyTorch's two divisions; one division per loop, which keeps ptxas's slow-path call from spilling)
    const int warp = t >> 5, lane = t & 31, warps = threads >> 5;
    float positive = 0.f;  // this warp's rows with Σ_t m > 0
    for (int64_t r = warp; r < rows; r += warps) {
      const float row_sum = warp_sum(lane_row_sum(mask, r, cols, lane));
      positive += row_sum > 0.f ? 1.f : 0.f;
      for (int64_t c = lane; c < cols; c += 32) weights[r * cols + c] = divide_or_zero(mask[r * cols + c], row_sum);
    }
    const float non_empty = block_sum(lane == 0 ? positive : 0.f);  // (its __syncthreads: the writes above visible)
    for (int64_t i = t; i < n; i += threads) weights[i] = divide_or_zero(weights[i], non_empty);
  } else {
    for (int64_t i = t; i < n; i += threads) weights[i] = token_weight(agg, mask[i], total, rows, cols);
  }
  if (t == 0) *total_out = total;
}

__global__ void __launch_bounds__(kAggregateThreads)
    loss_sums_kernel(const float* __restrict__ weights, const float* __restrict__ mask,
                     const float* __restrict__ total, const float* __restrict__ term,
                     const float* __restrict__ clipped, const float* __restrict__ logp,
                     const float* __restrict__ old_logp, float* __restrict__ loss, float* __restrict__ means,
                     int64_t n) {
  const LossSums part = strided_loss_sums(weights, mask, term, clipped, logp, old_logp, n, threadIdx.x, blockDim.x);
  const LossSums sums = block_reduce(part, LossSums{0.f, 0.f, 0.f}, loss_sums_merge, [](const LossSums& s, int off) {
    return LossSums{__shfl_xor_sync(0xffffffffu, s.loss, off), __shfl_xor_sync(0xffffffffu, s.clipped, off),
                    __shfl_xor_sync(0xffffffffu, s.half_sq, off)};
  });
  if (threadIdx.x == 0) {
    *loss = sums.loss;
    means[0] = divide_or_zero(sums.clipped, *total);
    means[1] = divide_or_zero(sums.half_sq, *total);
  }
}

}  // namespace

cudaError_t launch_loss_weights(const float* mask, float* weights, float* total, int64_t rows, int64_t cols,
                                LossAgg agg, cudaStream_t stream) {
  if (rows < 0 || cols < 0 || static_cast<int>(agg) < 0 || static_cast<int>(agg) > 3) return cudaErrorInvalidValue;
  loss_weights_kernel<<<1, kAggregateThreads, 0, stream>>>(mask, weights, total, rows, cols, agg);
  return cudaGetLastError();
}

cudaError_t launch_loss_sums(const float* weights, const float* mask, const float* total, const float* term,
                             const float* clipped, const float* logp, const float* old_logp, float* loss,
                             float* means, int64_t n, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  loss_sums_kernel<<<1, kAggregateThreads, 0, stream>>>(weights, mask, total, term, clipped, logp, old_logp, loss,
                                                        means, n);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rlhf_kernels
