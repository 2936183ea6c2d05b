// The exact KL's gradient over a range of one row's columns: what kl.cu's backward kernel runs per CTA, and the
// CPU emulation (tests/cuda/row_stats_emulation.cpp) thread by thread. CUDA headers only.
//
// With p = softmax(z), q = softmax(r), z = x / T, r = x_ref / T and the row's upstream gradient G:
//   ∂KL/∂x     = G/T · p·(log p - log q - KL)       (0 where p or G is 0, a masked row's KL may be infinite;
//                                                    NaN logits stay NaN)
//   ∂KL/∂x_ref = G/T · (q - p)                      (kRefGrad only)
// from the forward's lse_z, lse_r and KL (log p = z - lse_z, log q = r - lse_r).
#pragma once

#include "row_grad.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace detail {

// Columns [c_lo, c_hi) of the row's gradients, thread `first` of `step`: dz_row[c] = ∂KL/∂x[c] (and dr_row[c] =
// ∂KL/∂x_ref[c] with kRefGrad). g = G/T; klv, lz, lr the row's KL, lse_z and lse_r. The vectors are aligned to
// dz_row's address (DstVecs); x, x_ref and dr_row may sit at any other alignment (element loads / stores then).
template <typename T, bool kRefGrad>
RK_HD void write_kl_grad_range(T* __restrict__ dz_row, T* __restrict__ dr_row, const T* __restrict__ x,
                               const T* __restrict__ xr, int64_t c_lo, int64_t c_hi, int64_t first, int64_t step,
                               float g, float klv, float lz, float lr, float inv_t) {
  constexpr int kVec = Vec<T>::kSize;
  const DstVecs dv = dst_vecs(dz_row, c_lo, c_hi);
  // co-aligned in practice (fresh allocations of one shape); if not, dr takes scalar stores
  const bool dr_vec = kRefGrad && co_aligned(dr_row, dz_row);
  const bool x_aligned = co_aligned(x, dz_row), r_aligned = co_aligned(xr, dz_row);
  const auto write_vec = [&](int64_t k, bool whole, bool xa, bool ra, auto unit_t) {
    constexpr bool kUnit = decltype(unit_t)::value;  // inv_t == 1: z = x, r = x_ref without the multiplies
    const int64_t c0 = k * kVec - dv.pre;
    float z[kVec], r[kVec], dz[kVec];
    load_cols<T, kUnit>(x, c0, whole, xa, c_lo, c_hi, inv_t, 0.f, z);
    load_cols<T, kUnit>(xr, c0, whole, ra, c_lo, c_hi, inv_t, 0.f, r);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float lp = z[j] - lz;
      const float lq = r[j] - lr;
      const float p = exp2_ftz(lp * kLog2e);
      float d = (p > 0.f && g != 0.f) ? g * p * (lp - lq - klv) : 0.f;
      dz[j] = lp != lp ? lp : d;  // NaN logits stay NaN
      if constexpr (kRefGrad) r[j] = g * (exp2_ftz(lq * kLog2e) - p);
    }
    store_cols(dz_row, c0, whole, c_lo, c_hi, dz);
    if constexpr (kRefGrad) store_cols(dr_row, c0, whole && dr_vec, c_lo, c_hi, r);
  };
  if constexpr (kRefGrad) {  // one loop over every vector (the split below took this variant from 35 to 48 registers)
#pragma unroll 2
    for (int64_t k = dv.k_lo + first; k < dv.k_hi; k += step) {
      const int64_t c0 = k * kVec - dv.pre;
      write_vec(k, c0 >= c_lo && c0 + kVec <= c_hi, x_aligned, r_aligned, std::false_type{});
    }
    return;
  }
  // the partial vectors, at most one at each end (thread 0 the head, the last thread the tail), then the whole ones
  // in a loop compiled for co-aligned inputs, the usual case: with `whole` and the two alignments runtime values
  // inside one loop, nvcc predicated every load path into every iteration (the element loads of both inputs issued,
  // switched off, beside the 16-byte ones)
  const int64_t last = step - 1;
  if (first == 0 && dv.k_lo < dv.whole_lo) write_vec(dv.k_lo, false, x_aligned, r_aligned, std::false_type{});
  if (first == last && dv.whole_hi < dv.k_hi) write_vec(dv.k_hi - 1, false, x_aligned, r_aligned, std::false_type{});
  if (x_aligned && r_aligned && inv_t == 1.f) {  // T = 1, the usual case: two multiplies fewer per column
#pragma unroll 2
    for (int64_t k = dv.whole_lo + first; k < dv.whole_hi; k += step) write_vec(k, true, true, true, std::true_type{});
  } else if (x_aligned && r_aligned) {
#pragma unroll 2
    for (int64_t k = dv.whole_lo + first; k < dv.whole_hi; k += step) write_vec(k, true, true, true, std::false_type{});
  } else {
#pragma unroll 2
    for (int64_t k = dv.whole_lo + first; k < dv.whole_hi; k += step) {
      write_vec(k, true, x_aligned, r_aligned, std::false_type{});
    }
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
