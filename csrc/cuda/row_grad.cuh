// Writing a row of the logits' gradient: column loads / stores in 16-byte vectors, the range
// writer shared by the logprobs backward and the fused PPO forward-with-gradient, and the
// log-prob gradient itself. Every function is __host__ __device__, so the CPU emulation
// (tests/cuda/row_stats_emulation.cpp) runs the same code thread by thread.
//
// Vectors are aligned to the *destination* row's address (DstVecs): vector k covers columns
// [k·kVec - pre, (k+1)·kVec - pre). Those wholly inside the range are one 16-byte load (when
// the source row is co-aligned; element loads otherwise) and one 16-byte store; at most the
// first and the last vector of a range are partial and are read and written element by element,
// so nothing outside the range is touched (neighbouring CTAs own the rest of such a vector).
#pragma once

#include <type_traits>

#include "row_stats.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace detail {

template <typename T>
RK_HD T from_float(float v);
template <>
RK_HD float from_float<float>(float v) {
  return v;
}
template <>
RK_HD __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
RK_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Reads columns [c0, c0 + kVec) of src·inv_t into z[] (columns outside [c_lo, c_hi) get `fill`):
// one 16-byte load when the vector is whole and src + c0 is 16-byte aligned, else element by
// element. A generic load: src may be global or shared memory. z = x·inv_t is rounded on its
// own (mul_rn), as the forward rounds the row maximum, so lp = z - lse of the top logit stays
// consistent with the forward's lse instead of keeping a fused product's residue. kUnitT: the caller knows
// inv_t == 1, where x·1 is x exactly (a NaN stays a NaN), so the multiply is left out: the same values.
template <typename T, bool kUnitT = false>
RK_HD void load_cols(const T* __restrict__ src, int64_t c0, bool whole, bool aligned, int64_t c_lo, int64_t c_hi,
                     float inv_t, float fill, float (&z)[Vec<T>::kSize]) {
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
    for (int j = 0; j < kVec; ++j) z[j] = kUnitT ? to_float(v.elems[j]) : mul_rn(to_float(v.elems[j]), inv_t);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t c = c0 + j;
      z[j] = (c >= c_lo && c < c_hi) ? mul_rn(to_float(src[c]), inv_t) : fill;
    }
  }
}

// Writes v[] to columns [c0, c0 + kVec) ∩ [c_lo, c_hi) of dst (one 16-byte store when whole).
template <typename T>
RK_HD void store_cols(T* __restrict__ dst, int64_t c0, bool whole, int64_t c_lo, int64_t c_hi,
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

// Vectors of dst_row that cover columns [c_lo, c_hi): k in [k_lo, k_hi); those in
// [whole_lo, whole_hi) lie inside the range.
struct DstVecs {
  int64_t pre, k_lo, k_hi, whole_lo, whole_hi;
};

template <typename T>
RK_HD DstVecs dst_vecs(const T* dst_row, int64_t c_lo, int64_t c_hi) {
  constexpr int kVec = Vec<T>::kSize;
  const int64_t pre = static_cast<int64_t>((reinterpret_cast<uintptr_t>(dst_row) & 15u) / sizeof(T));
  const int64_t k_lo = (c_lo + pre) / kVec;
  const int64_t k_hi = c_hi > c_lo ? (c_hi + pre + kVec - 1) / kVec : k_lo;
  const int64_t first_whole = (c_lo + pre + kVec - 1) / kVec;
  const int64_t whole_lo = first_whole < k_hi ? first_whole : k_hi;
  const int64_t last_whole = c_hi > c_lo ? (c_hi + pre) / kVec : k_lo;
  return {pre, k_lo, k_hi, whole_lo, last_whole > whole_lo ? last_whole : whole_lo};
}

// True when src_row + c and dst_row + c have the same address modulo 16 (for every c).
template <typename T>
RK_HD bool co_aligned(const T* src_row, const T* dst_row) {
  return ((reinterpret_cast<uintptr_t>(src_row) ^ reinterpret_cast<uintptr_t>(dst_row)) & 15u) == 0;
}

// dst_row[c] = f(src_row[c]·inv_t, c == target) for c in [c_lo, c_hi). This thread takes the
// whole vectors whole_lo + first, + step, ...; thread 0 the partial head, thread step - 1 the tail.
// src_row may point to global or shared memory. The target's column gets f(·, true): in a partial
// vector through a per-vector test, in a whole one by a second store after the loop (its logit read before the
// loop, or by the caller, and kept by Stash::put / Stash::get, so dst_row may be src_row: every column is read
// before it is written). `reverse` walks this thread's
// vectors from the last to the first (the same vectors, the same values): a second sweep over a
// row the first sweep read in increasing order then starts with the lines read last, the likeliest
// to be still in L2.
template <typename Stash, typename T, typename F>
RK_HD void write_row_range(T* __restrict__ dst_row, const T* __restrict__ src_row, int64_t c_lo, int64_t c_hi,
                           float inv_t, int64_t target, int64_t first, int64_t step, const F& f,
                           bool reverse = false) {
  constexpr int kVec = Vec<T>::kSize;
  const DstVecs dv = dst_vecs(dst_row, c_lo, c_hi);
  const bool aligned = co_aligned(src_row, dst_row);
  // a partial vector (head or tail of the range): element loads and stores, the target tested per column
  const auto write_partial_vec = [&](int64_t k) {
    const int64_t c0 = k * kVec - dv.pre;
    float z[kVec];
    load_cols(src_row, c0, false, aligned, c_lo, c_hi, inv_t, 0.f, z);
    const int64_t jt = target - c0;
    if (jt >= 0 && jt < kVec) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) z[j] = f(z[j], j == jt);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) z[j] = f(z[j], false);
    }
    store_cols(dst_row, c0, false, c_lo, c_hi, z);
  };
  // the partial vectors, at most one at each end: the head by thread 0, the tail by thread step - 1
  if (first == 0 && dv.k_lo < dv.whole_lo) write_partial_vec(dv.k_lo);
  if (first == step - 1 && dv.whole_hi < dv.k_hi) write_partial_vec(dv.k_hi - 1);
  // This thread's whole vectors, whole_lo + first + i·step for i < count, forwards or (reverse) backwards: one loop
  // compiled per source alignment (with `aligned` a runtime value inside the loop, nvcc predicated both loads into
  // every iteration: the eight element loads and their packing, 12 instructions per bf16 vector, issued switched
  // off beside the one 16-byte load), stepping the column rather than recomputing it from the vector index, and
  // without a per-vector target test: every column is written as a non-target, then the target's column, if it
  // lies in one of this thread's vectors, is rewritten by this same thread (program order: the later store wins)
  // with its own term from the same z, so the row holds the same bits. About 15 instructions fewer per vector.
  const int64_t n = dv.whole_hi - dv.whole_lo;
  const int64_t count = first < n ? (n - 1 - first) / step + 1 : 0;
  const int64_t stride = step * kVec;
  const int64_t c_first = (dv.whole_lo + first) * kVec - dv.pre;
  const int64_t c_start = reverse ? c_first + (count - 1) * stride : c_first;
  const int64_t c_step = reverse ? -stride : stride;
  // the target's column if it lies in one of this thread's whole vectors, else -1 (decided before the loop, so that
  // only this value, not the row's bounds, stays live through it: the bounds had spilled a register on sm_80)
  // Its z (logit / T) must be read before the loop (with dst_row == src_row the loop overwrites the logit) and is
  // kept by Stash: Stash::kPreload, read here by the owner into Stash (a shared-memory slot on the GPU); else the
  // caller has put it there before the call (the PPO kernels: thread 0 holds the target's logit from sweep 1; the
  // read here, in front of the loop, made their 64-register instantiations spill).
  int64_t c_fix = -1;
  if (target >= c_lo && target < c_hi) {
    const int64_t kt = (target + dv.pre) / kVec;  // the vector holding the target's column
    if (kt >= dv.whole_lo && kt < dv.whole_hi && (kt - dv.whole_lo) % step == first) {
      c_fix = target;
      if constexpr (Stash::kPreload) Stash::put(mul_rn(to_float(src_row[c_fix]), inv_t));
    }
  }
  // One loop per source alignment and per whether inv_t is 1 (T = 1, the usual training temperature: the loop then
  // drops z = x·inv_t, one multiply of about nine instructions per column of the fused PPO sweep 2, same values).
  const auto whole_vecs = [&](auto src_aligned, auto unit_t) {
    constexpr bool kAligned = decltype(src_aligned)::value;
    constexpr bool kUnit = decltype(unit_t)::value;
    int64_t c0 = c_start;
#pragma unroll 2
    for (int64_t i = 0; i < count; ++i, c0 += c_step) {
      float z[kVec];
      load_cols<T, kUnit>(src_row + c0, 0, true, kAligned, 0, kVec, inv_t, 0.f, z);
#pragma unroll
      for (int j = 0; j < kVec; ++j) z[j] = f(z[j], false);
      store_cols(dst_row + c0, 0, true, 0, kVec, z);
    }
  };
  const bool unit = inv_t == 1.f;
  if (aligned) {
    unit ? whole_vecs(std::true_type{}, std::true_type{}) : whole_vecs(std::true_type{}, std::false_type{});
  } else {
    unit ? whole_vecs(std::false_type{}, std::true_type{}) : whole_vecs(std::false_type{}, std::false_type{});
  }
  if (c_fix >= 0) dst_row[c_fix] = from_float<T>(f(Stash::get(), true));
}

// dst_row[c] = 0 for c in [c_lo, c_hi) (ignored tokens: the logits are not read).
template <typename T>
RK_HD void zero_row_range(T* __restrict__ dst_row, int64_t c_lo, int64_t c_hi, int64_t first, int64_t step) {
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

// p·t + G_logp/T·[c == y] as one explicit FMA whose addend is 0 off the target (p·t rounded once, as a product;
// only a zero's sign can differ, which no comparison sees). Left to the compiler, the target's p·t + g was fused
// where `is_target` is a constant (write_row_range's rewrite after its loop) and rounded twice where it is a
// runtime select (a partial vector's per-column test): the target's gradient then changed in its last bit with
// the gradient row's alignment (H200 run 6, fp32 V = 7: written into the logits' base against a fresh buffer).
RK_HD float target_term(float p, float t, float g_logp, bool is_target) {
  return fmaf(p, t, is_target ? g_logp : 0.f);
}

// ∂(G_logp·logp + G_H·H)/∂x at one column of z = x / T:
//   (p·(-(G_logp + G_H·H) - G_H·lp) + G_logp·[c == y]) / T,   lp = z - lse, p = exp(lp)
// The 1/T is folded into the three coefficients; p is one ex2 (0 below 2^-126, as the forward).
struct LogprobGrad {
  float lse, a, g_ent, g_logp;  // a = -(G_logp + G_H·H)/T, g_ent = G_H/T, g_logp = G_logp/T
  RK_HD float operator()(float z, bool is_target) const {
    float lp = z - lse;
    const float p = exp2_ftz(lp * kLog2e);
    lp = lp == neg_inf() ? 0.f : lp;  // p = 0 there: keeps 0·(-inf) out
    return target_term(p, fmaf(-g_ent, lp, a), g_logp, is_target);
  }
};

RK_HD LogprobGrad make_logprob_grad(float lse, float entropy, float g_logp, float g_ent, float inv_t) {
  return {lse, -(g_logp + g_ent * entropy) * inv_t, g_ent * inv_t, g_logp * inv_t};
}

// LogprobGrad where the entropy gets no gradient (G_H = 0: a PPO / GRPO loss without an entropy bonus):
//   dz = p·a + G_logp·[c == y] / T
// The same values as LogprobGrad, whose a - g_ent·lp is then exactly a (up to the sign of a zero result, which no
// comparison sees), with three instructions fewer per column (the lp select and the fma). A kernel takes one or the
// other for a whole launch (ppo.cu: kNoEntropy): both loops in one kernel spilled registers.
struct LogprobGradNoEntropy {
  float lse, a, g_logp;
  RK_HD explicit LogprobGradNoEntropy(const LogprobGrad& f) : lse(f.lse), a(f.a), g_logp(f.g_logp) {}
  RK_HD float operator()(float z, bool is_target) const {
    const float p = exp2_ftz((z - lse) * kLog2e);
    return target_term(p, a, g_logp, is_target);
  }
};

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
