// Exact full-vocabulary KL(softmax(z) || softmax(r)) on the GPU, z = x / T, r = x_ref / T.
//
// Forward, one CTA per row, one read of both rows. Each thread keeps online states of
// both rows and u = Σ p·(log p - log q) relative to both running maxima (kl_stats.cuh), so rows
// equal up to a constant give an exactly-zero KL (no lse_z - lse_r cancellation); the threads
// are merged like the softmax state:
//   KL = Σ p·(log p - log q) = ln2·U / Sz - log Sz + log Sr,  lse_z = Mz + log Sz,  lse_r = Mr + log Sr
// Backward, a 2-D grid (rows x column blocks), rebuilding log p = z - lse_z, log q = r - lse_r:
//   dz = g·p·(log p - log q - KL) / T,   dr = g·(q - p) / T   (when wanted)
// Same formulas as rlhf_kernels/triton/kl.py: q = 0 where p > 0 gives KL = +inf, NaN logits
// propagate to their row; terms whose p underflows to 0 contribute 0 (as in the reference).
#include "kl_grad.cuh"
#include "kl_stats.cuh"
#include "row_common.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace {

using namespace detail;

__device__ __forceinline__ KlStats kl_shfl(const KlStats& s, int off) {
  return {__shfl_xor_sync(0xffffffffu, s.mz, off), __shfl_xor_sync(0xffffffffu, s.sz, off),
          __shfl_xor_sync(0xffffffffu, s.mr, off), __shfl_xor_sync(0xffffffffu, s.sr, off),
          __shfl_xor_sync(0xffffffffu, s.u, off)};
}

template <typename T>
__global__ void __launch_bounds__(512) kl_fwd_kernel(const T* __restrict__ logits, const T* __restrict__ ref_logits,
                                                     float* kl, float* lse_z, float* lse_r, int64_t rows_inner,
                                                     int64_t stride_b, int64_t stride_t, int64_t ref_stride_b,
                                                     int64_t ref_stride_t, int64_t vocab, float inv_t) {
  const int64_t row = blockIdx.x;
  const T* x = row_ptr(logits, row, rows_inner, stride_b, stride_t);
  const T* xr = row_ptr(ref_logits, row, rows_inner, ref_stride_b, ref_stride_t);
  const float c = inv_t * kLog2e;
  KlStats st = sweep_kl_stats<T, 2>(x, xr, vocab, threadIdx.x, blockDim.x, c);
  st = block_reduce(st, kl_init(), [c](const KlStats& a, const KlStats& b) { return kl_merge(a, b, c); }, kl_shfl);
  if (threadIdx.x == 0) {
    const KlSummary r = kl_finish(st, inv_t);
    kl[row] = r.kl;
    lse_z[row] = r.lse_z;
    lse_r[row] = r.lse_r;
  }
}

// kRefGrad: also dr (ref_logits trains). Without it (a frozen reference, the usual case) the loop neither
// computes q nor holds dr's row, strides and alignment: one exp per element instead of two, and 32 registers
// instead of 35 on sm_90a, so 8 CTAs of 256 fit per SM instead of 6.
template <typename T, bool kRefGrad>
__global__ void __launch_bounds__(256) kl_bwd_kernel(T* __restrict__ grad_z, T* __restrict__ grad_r,
                                                     const T* __restrict__ logits, const T* __restrict__ ref_logits,
                                                     const float* __restrict__ grad, const float* __restrict__ kl,
                                                     const float* __restrict__ lse_z,
                                                     const float* __restrict__ lse_r, int64_t rows_inner,
                                                     int64_t stride_b, int64_t stride_t, int64_t ref_stride_b,
                                                     int64_t ref_stride_t, int64_t gz_stride_b, int64_t gz_stride_t,
                                                     int64_t gr_stride_b, int64_t gr_stride_t, int64_t vocab,
                                                     float inv_t, int64_t cols_per_cta) {
  const int64_t row = blockIdx.x;
  const int64_t c_lo = static_cast<int64_t>(blockIdx.y) * cols_per_cta;
  const int64_t c_hi = c_lo + cols_per_cta < vocab ? c_lo + cols_per_cta : vocab;
  const T* x = row_ptr(logits, row, rows_inner, stride_b, stride_t);
  const T* xr = row_ptr(ref_logits, row, rows_inner, ref_stride_b, ref_stride_t);
  T* dz_row = row_ptr(grad_z, row, rows_inner, gz_stride_b, gz_stride_t);
  T* dr_row = kRefGrad ? row_ptr(grad_r, row, rows_inner, gr_stride_b, gr_stride_t) : nullptr;
  const float g = grad[row] * inv_t;
  const float klv = kl[row], lz = lse_z[row], lr = lse_r[row];
  write_kl_grad_range<T, kRefGrad>(dz_row, dr_row, x, xr, c_lo, c_hi, threadIdx.x, blockDim.x, g, klv, lz, lr,
                                   inv_t);
}

}  // namespace

cudaError_t launch_kl_fwd(DType dtype, const void* logits, const void* ref_logits, float* kl, float* lse_z,
                          float* lse_r, int64_t rows_outer, int64_t rows_inner, int64_t stride_b, int64_t stride_t,
                          int64_t ref_stride_b, int64_t ref_stride_t, int64_t vocab, float inv_t,
                          cudaStream_t stream) {
  const int64_t rows = rows_outer * rows_inner;
  if (rows == 0) return cudaSuccess;
  if (rows > kMaxGridX || vocab < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int threads = forward_threads(vectors_per_row<T>(vocab), kKlForwardCap);
    kl_fwd_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<const T*>(logits), static_cast<const T*>(ref_logits), kl, lse_z, lse_r, rows_inner, stride_b,
        stride_t, ref_stride_b, ref_stride_t, vocab, inv_t);
    return cudaGetLastError();
  });
}

cudaError_t launch_kl_bwd(DType dtype, void* grad_z, void* grad_r, const void* logits, const void* ref_logits,
                          const float* grad, const float* kl, const float* lse_z, const float* lse_r,
                          int64_t rows_outer, int64_t rows_inner, int64_t stride_b, int64_t stride_t,
                          int64_t ref_stride_b, int64_t ref_stride_t, int64_t gz_stride_b, int64_t gz_stride_t,
                          int64_t gr_stride_b, int64_t gr_stride_t, int64_t vocab, float inv_t,
                          cudaStream_t stream) {
  const int64_t rows = rows_outer * rows_inner;
  if (rows == 0) return cudaSuccess;
  if (rows > kMaxGridX || vocab < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    SplitGrid g;
    if (!split_grid<T>(rows, vocab, g)) return cudaErrorInvalidValue;
    auto* kernel = grad_r != nullptr ? kl_bwd_kernel<T, true> : kl_bwd_kernel<T, false>;
    kernel<<<g.grid, g.threads, 0, stream>>>(static_cast<T*>(grad_z), static_cast<T*>(grad_r),
                                             static_cast<const T*>(logits), static_cast<const T*>(ref_logits), grad,
                                             kl, lse_z, lse_r, rows_inner, stride_b, stride_t, ref_stride_b,
                                             ref_stride_t, gz_stride_b, gz_stride_t, gr_stride_b, gr_stride_t, vocab,
                                             inv_t, g.cols_per_cta);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace rlhf_kernels
