// Device helpers shared by the row kernels (logprobs.cu, kl.cu, ppo.cu). CUDA headers only.
//
// Rows are walked in 16-byte vectors of kVec = 16 / sizeof(T) elements, aligned to
// the row's *address*, not to column 0: with pre = (address of column 0 % 16) / sizeof(T),
// vector k covers columns [k·kVec - pre, (k+1)·kVec - pre). Every vector that lies wholly
// inside [0, V) is one 128-bit load; at most the first and the last are partial and
// are read element by element under a column mask. So any row start (odd V, strided
// views like logits[:, :-1]) is vectorised, and nothing outside [0, V) is ever read.
//
// Online softmax per thread: (m, s, t) = (running max, Σ exp(z - m), Σ exp(z - m)·(z - m)).
// A vector first raises m to its own max (one rescale exp when it grows), then adds
// its kVec terms: one exp per element. t relative to m keeps the entropy
// log s - t/s exact for logits of size 1e4 (no lse - Σp·z cancellation). -inf
// logits add exactly 0; a NaN logit makes s NaN, so it reaches that row's outputs only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace rlhf_kernels {
namespace cuda {
namespace detail {

constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  union {
    uint4 raw;
    T elems[kSize];
  };
};

// Geometry of one row in the address-aligned vector framing (see top of file).
struct RowVecs {
  int64_t pre;  // elements of the first vector that lie before column 0
  int64_t count;  // number of vectors touching [0, V)
};

template <typename T>
__device__ __forceinline__ RowVecs row_vecs(const T* row, int64_t V) {
  constexpr int kVec = Vec<T>::kSize;
  const int64_t pre = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) & 15u) / sizeof(T));
  return {pre, (V + pre + kVec - 1) / kVec};
}

// Loads vector k of `row` scaled by inv_t into z[]; columns outside [0, V) become -inf.
// Returns the first column of the vector.
template <typename T>
__device__ __forceinline__ int64_t load_scaled(const T* __restrict__ row, int64_t k, int64_t pre, int64_t V,
                                               float inv_t, float (&z)[Vec<T>::kSize]) {
  constexpr int kVec = Vec<T>::kSize;
  const int64_t c0 = k * kVec - pre;
  if (c0 >= 0 && c0 + kVec <= V) {
    Vec<T> v;
    v.raw = __ldg(reinterpret_cast<const uint4*>(row + c0));
#pragma unroll
    for (int j = 0; j < kVec; ++j) z[j] = to_float(v.elems[j]) * inv_t;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t c = c0 + j;
      z[j] = (c >= 0 && c < V) ? to_float(row[c]) * inv_t : neg_inf();
    }
  }
  return c0;
}

// ---------------------------------------------------------------- online softmax state

struct SoftmaxState {
  float m, s, t;
};

__device__ __forceinline__ SoftmaxState softmax_init() { return {neg_inf(), 0.f, 0.f}; }

// Folds n values z[] (already / T) into the state: one exp per value.
template <int N>
__device__ __forceinline__ void softmax_update(SoftmaxState& st, const float (&z)[N]) {
  float cm = z[0];
#pragma unroll
  for (int j = 1; j < N; ++j) cm = fmaxf(cm, z[j]);  // NaN is skipped here but reaches s below
  if (cm > st.m) {
    if (st.m != neg_inf()) {
      const float shift = st.m - cm;
      const float f = __expf(shift);
      st.t = (st.t + st.s * shift) * f;
      st.s *= f;
    }
    st.m = cm;
  }
  // while every value so far is -inf, use 0 as the reference: -inf - 0 = -inf adds 0, NaN adds NaN
  const float ref = st.m == neg_inf() ? 0.f : st.m;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float d = z[j] - ref;
    const float e = __expf(d);
    st.s += e;
    st.t = fmaf(e, fmaxf(d, -FLT_MAX), st.t);  // 0·(-inf) would be NaN: the floor keeps it 0
  }
}

// Merges b into a (associative; the order is fixed by the reduction tree, so every
// thread that merges the same states gets the same bits).
__device__ __forceinline__ SoftmaxState softmax_merge(SoftmaxState a, SoftmaxState b) {
  const float M = fmaxf(a.m, b.m);
  SoftmaxState out{M, 0.f, 0.f};
  if (M == neg_inf()) {  // both empty (or NaN-only): sums carry any NaN
    out.s = a.s + b.s;
    out.t = a.t + b.t;
    return out;
  }
  if (a.s != 0.f) {  // a lane that saw only -inf has s == 0 and m == -inf: skip its 0·inf
    const float d = a.m - M;
    const float w = __expf(d);
    out.s += w * a.s;
    if (w > 0.f) out.t += w * (a.t + a.s * d);
  }
  if (b.s != 0.f) {
    const float d = b.m - M;
    const float w = __expf(d);
    out.s += w * b.s;
    if (w > 0.f) out.t += w * (b.t + b.s * d);
  }
  return out;
}

__device__ __forceinline__ SoftmaxState shfl_xor(const SoftmaxState& st, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, st.m, lane_mask), __shfl_xor_sync(0xffffffffu, st.s, lane_mask),
          __shfl_xor_sync(0xffffffffu, st.t, lane_mask)};
}

// Block-wide reduction of a state with a binary `merge`, result returned to every thread.
// Warp shuffles first, then one slot per warp in shared memory. blockDim.x is a
// multiple of 32 and at most kMaxThreads. Safe to call repeatedly in one kernel.
template <typename State, typename Merge, typename Shfl>
__device__ __forceinline__ State block_reduce(State st, State identity, Merge merge, Shfl shfl) {
  __shared__ State warp_states[kMaxThreads / 32];
  __shared__ State result;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = merge(st, shfl(st, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < warps ? warp_states[lane] : identity;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) st = merge(st, shfl(st, off));
    if (lane == 0) result = st;
  }
  __syncthreads();
  return result;
}

__device__ __forceinline__ SoftmaxState block_softmax_reduce(SoftmaxState st) {
  return block_reduce(st, softmax_init(), [](SoftmaxState a, SoftmaxState b) { return softmax_merge(a, b); },
                      [](const SoftmaxState& a, int off) { return shfl_xor(a, off); });
}

// One pass over a row: the (M, S, T) of z = x·inv_t, returned to every thread of the block.
template <typename T>
__device__ __forceinline__ SoftmaxState row_softmax_stats(const T* __restrict__ row, int64_t V, float inv_t) {
  constexpr int kVec = Vec<T>::kSize;
  constexpr int kUnroll = 4;  // 4 x 16 B of loads in flight per thread
  const RowVecs rv = row_vecs(row, V);
  SoftmaxState st = softmax_init();
  int64_t k = threadIdx.x;
  const int64_t stride = blockDim.x;
  for (; k + (kUnroll - 1) * stride < rv.count; k += kUnroll * stride) {
    float z[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_scaled(row, k + u * stride, rv.pre, V, inv_t, z[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) softmax_update(st, z[u]);
  }
  for (; k < rv.count; k += stride) {
    float z[kVec];
    load_scaled(row, k, rv.pre, V, inv_t, z);
    softmax_update(st, z);
  }
  return block_softmax_reduce(st);
}

// Row start of row `row` of a [B, T, V] view with strides (stride_b, stride_t, 1); P may be const
// (logits) or not (gradients written at their own row strides).
template <typename P>
__device__ __forceinline__ P* row_ptr(P* base, int64_t row, int64_t rows_inner, int64_t stride_b,
                                      int64_t stride_t) {
  const int64_t b = row / rows_inner;
  return base + b * stride_b + (row - b * rows_inner) * stride_t;
}

// ---------------------------------------------------------------- gradient writer

// Reads columns [c0, c0 + kVec) of src·inv_t into z[] (columns outside [c_lo, c_hi) get `fill`):
// one 16-byte load when the vector is whole and src + c0 is 16-byte aligned, else element by element.
template <typename T>
__device__ __forceinline__ void load_cols(const T* __restrict__ src, int64_t c0, bool whole, bool aligned,
                                          int64_t c_lo, int64_t c_hi, float inv_t, float fill,
                                          float (&z)[Vec<T>::kSize]) {
  constexpr int kVec = Vec<T>::kSize;
  if (whole) {
    Vec<T> v;
    if (aligned) {
      v.raw = *reinterpret_cast<const uint4*>(src + c0);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) v.elems[j] = src[c0 + j];
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) z[j] = to_float(v.elems[j]) * inv_t;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t c = c0 + j;
      z[j] = (c >= c_lo && c < c_hi) ? to_float(src[c]) * inv_t : fill;
    }
  }
}

// Writes v[] to columns [c0, c0 + kVec) ∩ [c_lo, c_hi) of dst (one 16-byte store when whole).
template <typename T>
__device__ __forceinline__ void store_cols(T* __restrict__ dst, int64_t c0, bool whole, int64_t c_lo, int64_t c_hi,
                                           const float (&v)[Vec<T>::kSize]) {
  constexpr int kVec = Vec<T>::kSize;
  if (whole) {
    Vec<T> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) out.elems[j] = from_float<T>(v[j]);
    *reinterpret_cast<uint4*>(dst + c0) = out.raw;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t c = c0 + j;
      if (c >= c_lo && c < c_hi) dst[c] = from_float<T>(v[j]);
    }
  }
}

// Vectors of dst_row (aligned to its address) that cover columns [c_lo, c_hi): k in [k_lo, k_hi),
// vector k starting at column k·kVec - pre.
struct DstVecs {
  int64_t pre, k_lo, k_hi;
};

template <typename T>
__device__ __forceinline__ DstVecs dst_vecs(const T* dst_row, int64_t c_lo, int64_t c_hi) {
  constexpr int kVec = Vec<T>::kSize;
  const int64_t pre = static_cast<int64_t>((reinterpret_cast<uintptr_t>(dst_row) & 15u) / sizeof(T));
  return {pre, (c_lo + pre) / kVec, c_hi > c_lo ? (c_hi + pre + kVec - 1) / kVec : (c_lo + pre) / kVec};
}

// True when src_row + c and dst_row + c have the same address modulo 16 (for every c).
template <typename T>
__device__ __forceinline__ bool co_aligned(const T* src_row, const T* dst_row) {
  return ((reinterpret_cast<uintptr_t>(src_row) ^ reinterpret_cast<uintptr_t>(dst_row)) & 15u) == 0;
}

// dst_row[c] = f(src_row[c]·inv_t, c) for c in [c_lo, c_hi); this thread takes the dst vectors
// first, first + step, ... of the range. src_row may point to global or shared memory.
template <typename T, typename F>
__device__ __forceinline__ void write_row_range(T* __restrict__ dst_row, const T* __restrict__ src_row, int64_t c_lo,
                                                int64_t c_hi, float inv_t, int64_t first, int64_t step, F f) {
  constexpr int kVec = Vec<T>::kSize;
  const DstVecs dv = dst_vecs(dst_row, c_lo, c_hi);
  const bool aligned = co_aligned(src_row, dst_row);
#pragma unroll 2
  for (int64_t k = dv.k_lo + first; k < dv.k_hi; k += step) {
    const int64_t c0 = k * kVec - dv.pre;
    const bool whole = c0 >= c_lo && c0 + kVec <= c_hi;
    float z[kVec];
    load_cols(src_row, c0, whole, aligned, c_lo, c_hi, inv_t, 0.f, z);
#pragma unroll
    for (int j = 0; j < kVec; ++j) z[j] = f(z[j], c0 + j);
    store_cols(dst_row, c0, whole, c_lo, c_hi, z);
  }
}

// dst_row[c] = 0 for c in [c_lo, c_hi) (ignored tokens: the logits are not read).
template <typename T>
__device__ __forceinline__ void zero_row_range(T* __restrict__ dst_row, int64_t c_lo, int64_t c_hi, int64_t first,
                                               int64_t step) {
  constexpr int kVec = Vec<T>::kSize;
  const DstVecs dv = dst_vecs(dst_row, c_lo, c_hi);
  float z[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) z[j] = 0.f;
  for (int64_t k = dv.k_lo + first; k < dv.k_hi; k += step) {
    const int64_t c0 = k * kVec - dv.pre;
    store_cols(dst_row, c0, c0 >= c_lo && c0 + kVec <= c_hi, c_lo, c_hi, z);
  }
}

// ---------------------------------------------------------------- log-prob gradient

// ∂(G_logp·logp + G_H·H)/∂z at one column, before the 1/T:
//   p·(-(G_logp + G_H·H) - G_H·lp) + G_logp·[c == y],   lp = z - lse, p = exp(lp)
struct LogprobGrad {
  float lse, a, g_ent, g_logp, inv_t;
  int64_t y;
  __device__ __forceinline__ float operator()(float z, int64_t c) const {
    float lp = z - lse;
    const float p = __expf(lp);
    lp = lp == neg_inf() ? 0.f : lp;  // p = 0 there: keeps 0·(-inf) out
    float dz = p * (a - g_ent * lp);
    if (c == y) dz += g_logp;
    return dz * inv_t;
  }
};

__device__ __forceinline__ LogprobGrad make_logprob_grad(float lse, float entropy, float g_logp, float g_ent,
                                                         int64_t y, float inv_t) {
  return {lse, -(g_logp + g_ent * entropy), g_ent, g_logp, inv_t, y};
}

// ---------------------------------------------------------------- KL estimators (k1/k2/k3)

// exp(d) - 1 - d without cancellation near 0 (Taylor to d^12 for |d| < 0.5), as the Triton kernels.
__device__ __forceinline__ float expm1_minus_x(float d) {
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
  p = fmaf(p, d, 0.5f);
  return fabsf(d) < 0.5f ? p * d * d : expf(d) - 1.f - d;
}

// estimator 1: k1 = -d, 2: k2 = d²/2, 3: k3 = exp(d) - 1 - d, with d = ref - logp.
__device__ __forceinline__ float kl_k(float logp, float ref, int estimator) {
  const float d = ref - logp;
  return estimator == 1 ? -d : (estimator == 2 ? 0.5f * d * d : expm1_minus_x(d));
}

// ∂k/∂logp (∂k/∂ref is its negative).
__device__ __forceinline__ float kl_k_dlogp(float logp, float ref, int estimator) {
  const float d = ref - logp;
  return estimator == 1 ? 1.f : (estimator == 2 ? -d : -(d + expm1_minus_x(d)));
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels

// ---------------------------------------------------------------- host helpers

#include "launchers.h"

namespace rlhf_kernels {
namespace cuda {
namespace detail {

// Calls f(T{}) with T the element type of `dtype`.
template <typename F>
inline cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Threads for a CTA that sweeps `vectors` 16-byte vectors: about 8+ vectors per thread, 32..max.
inline int sweep_threads(int64_t vectors, int max_threads = 512) {
  int t = 32;
  while (t < max_threads && static_cast<int64_t>(t) * 8 < vectors) t *= 2;
  return t;
}

template <typename T>
inline int64_t vectors_per_row(int64_t vocab) {
  constexpr int kVec = Vec<T>::kSize;
  return (vocab + kVec - 1) / kVec + 1;  // +1: a misaligned row start splits one vector in two
}

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

// Launch geometry of an elementwise row backward: CTA (row, split) writes columns
// [split·cols_per_cta, (split + 1)·cols_per_cta) ∩ [0, V). 256 threads with 8 vectors each per CTA
// (16K bf16 / 8K fp32 columns: a few CTAs per row at LLM vocabularies); one smaller CTA when the row fits.
// The backward kernels using it declare __launch_bounds__(256) to match.
struct SplitGrid {
  dim3 grid;
  int threads;
  int64_t cols_per_cta;
};

// False when the row count or the number of splits exceeds the grid limits.
template <typename T>
inline bool split_grid(int64_t rows, int64_t vocab, SplitGrid& out) {
  constexpr int kThreads = 256;
  out.cols_per_cta = static_cast<int64_t>(kThreads) * 8 * Vec<T>::kSize;
  const int64_t splits = (vocab + out.cols_per_cta - 1) / out.cols_per_cta;
  if (rows > kMaxGridX || splits > kMaxGridY) return false;
  out.threads = splits == 1 ? sweep_threads(vectors_per_row<T>(vocab), kThreads) : kThreads;
  out.grid = dim3(static_cast<unsigned>(rows), static_cast<unsigned>(splits));
  return true;
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
