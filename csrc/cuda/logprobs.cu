// Fused log-prob of the target token + entropy on the GPU (DESIGN.md §2).
//
// Forward, one CTA per row of z = x / T (one read of the logits, 16-byte loads): per thread
//   the online softmax statistics of row_stats.cuh (raw maximum, base-2 sums), merged by warp
//   shuffles then shared memory into (M, S, T_) of z:
//   lse = M + log S,  entropy = log S - T_ / S,  logp = (z[y] - M) - log S
// Both are 0 where y == ignore_index; a y outside [0, V) is never read and gives NaN logp.
//
// Backward, a 2-D grid (rows x column blocks), rebuilding p from the saved lse and
// entropy H (lp = z - lse, p = exp(lp)):
//   dz = p·(-(g_logp + g_H·H) - g_H·lp) + g_logp·onehot(y);   dlogits = dz / T
// written in the logits' dtype with 16-byte stores; ignored rows get zeros without
// reading the logits. Same formulas, order of operations and special cases as the
// Triton kernels (rlhf_kernels/triton/logprobs.py).
#include "row_common.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace {

using namespace detail;

template <typename T>
__global__ void __launch_bounds__(512) logprobs_fwd_kernel(const T* __restrict__ logits,
                                                           const int64_t* __restrict__ targets, float* logp,
                                                           float* entropy, float* lse, int64_t rows_inner,
                                                           int64_t stride_b, int64_t stride_t, int64_t vocab,
                                                           float inv_t, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const T* x = row_ptr(logits, row, rows_inner, stride_b, stride_t);
  const float c = inv_t * kLog2e;
  const RowVecs rv = row_vecs(x, vocab);
  RowStats st = sweep_row_stats<T, 4>(x, rv, vocab, 0, rv.count, threadIdx.x, blockDim.x, c, NoVecSink{});
  st = block_stats_reduce(st, c);
  if (threadIdx.x == 0) {
    const TokenOutputs out = token_outputs(x, targets[row], vocab, inv_t, ignore_index, st);
    logp[row] = out.logp;
    entropy[row] = out.entropy;
    lse[row] = out.lse;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) logprobs_bwd_kernel(T* __restrict__ grad, const T* __restrict__ logits,
                                                           const int64_t* __restrict__ targets,
                                                           const float* __restrict__ grad_logp,
                                                           const float* __restrict__ grad_entropy,
                                                           const float* __restrict__ lse,
                                                           const float* __restrict__ entropy, int64_t rows_inner,
                                                           int64_t stride_b, int64_t stride_t, int64_t grad_stride_b,
                                                           int64_t grad_stride_t, int64_t vocab, float inv_t,
                                                           int64_t ignore_index, int64_t cols_per_cta) {
  const int64_t row = blockIdx.x;
  const int64_t c_lo = static_cast<int64_t>(blockIdx.y) * cols_per_cta;
  const int64_t c_hi = c_lo + cols_per_cta < vocab ? c_lo + cols_per_cta : vocab;
  T* dx = row_ptr(grad, row, rows_inner, grad_stride_b, grad_stride_t);
  const int64_t y = targets[row];
  if (y == ignore_index) {
    zero_row_range(dx, c_lo, c_hi, threadIdx.x, blockDim.x);
    return;
  }
  const T* x = row_ptr(logits, row, rows_inner, stride_b, stride_t);
  const LogprobGrad f = make_logprob_grad(lse[row], entropy[row], grad_logp[row], grad_entropy[row], inv_t);
  write_row_range<SharedStash<true>>(dx, x, c_lo, c_hi, inv_t, y, threadIdx.x, blockDim.x, f);
}

}  // namespace

cudaError_t launch_logprobs_fwd(DType dtype, const void* logits, const int64_t* targets, float* logp, float* entropy,
                                float* lse, int64_t rows_outer, int64_t rows_inner, int64_t stride_b,
                                int64_t stride_t, int64_t vocab, float inv_t, int64_t ignore_index,
                                cudaStream_t stream) {
  const int64_t rows = rows_outer * rows_inner;
  if (rows == 0) return cudaSuccess;
  if (rows > kMaxGridX || vocab < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int threads = forward_threads(vectors_per_row<T>(vocab), kLogprobsForwardCap);
    logprobs_fwd_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<const T*>(logits), targets, logp, entropy, lse, rows_inner, stride_b, stride_t, vocab, inv_t,
        ignore_index);
    return cudaGetLastError();
  });
}

cudaError_t launch_logprobs_bwd(DType dtype, void* grad, const void* logits, const int64_t* targets,
                                const float* grad_logp, const float* grad_entropy, const float* lse,
                                const float* entropy, int64_t rows_outer, int64_t rows_inner, int64_t stride_b,
                                int64_t stride_t, int64_t grad_stride_b, int64_t grad_stride_t, int64_t vocab,
                                float inv_t, int64_t ignore_index, cudaStream_t stream) {
  const int64_t rows = rows_outer * rows_inner;
  if (rows == 0) return cudaSuccess;
  if (rows > kMaxGridX || vocab < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    SplitGrid g;
    if (!split_grid<T>(rows, vocab, g)) return cudaErrorInvalidValue;
    logprobs_bwd_kernel<T><<<g.grid, g.threads, 0, stream>>>(static_cast<T*>(grad), static_cast<const T*>(logits),
                                                         targets, grad_logp, grad_entropy, lse, entropy, rows_inner,
                                                         stride_b, stride_t, grad_stride_b, grad_stride_t, vocab,
                                                         inv_t, ignore_index, g.cols_per_cta);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace rlhf_kernels
