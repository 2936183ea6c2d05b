// One sweep over a pair of rows for the exact KL(softmax(z) || softmax(r)), z = x / T, r = x_ref / T:
// the per-thread state, its merge and the row's result. Used by kl.cu's forward and, on the host,
// by the CPU emulation (tests/cuda/row_stats_emulation.cu). Units as in row_stats.cuh: raw maxima
// mz, mr and base-2 exponents with c = log2(e) / T,
//   dz = (x - mz)·c,  dr = (x_ref - mr)·c,  sz = Σ 2^dz,  sr = Σ 2^dr,  u = Σ 2^dz·(dz - dr),
// so KL = Σ p·(log p - log q) = ln2·u/sz - log sz + log sr, lse_z = mz/T + log sz, lse_r = mr/T + log sr.
// u is relative to both running maxima: rows equal up to a constant give dz == dr term by term and
// an exactly-zero KL (no lse_z - lse_r cancellation); when a maximum rises, u moves by
// sz·(shift_z - shift_r), which is exactly 0 for equal rows. q = 0 where p > 0 gives u = +inf; terms
// whose p is 0 (a -inf logit, or 2^dz below 2^-126) add nothing (the reference's 0·x = 0).
#pragma once

#include "row_stats.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace detail {

struct KlStats {
  float mz, sz, mr, sr, u;
};

RK_HD KlStats kl_init() { return {neg_inf(), 0.f, neg_inf(), 0.f, 0.f}; }

template <int U, int N>
RK_HD void kl_update(KlStats& st, const float (&z)[U][N], const float (&r)[U][N], float c) {
  float cz = z[0][0], cr = r[0][0];
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      cz = fmaxf(cz, z[u][j]);
      cr = fmaxf(cr, r[u][j]);
    }
  }
  const bool up_z = cz > st.mz, up_r = cr > st.mr;
  if (up_z || up_r) {
    // a maximum rising from -inf has nothing to rescale (its sum is 0, or NaN, which stays)
    const float sh_z = up_z && st.mz != neg_inf() ? mul_rn(st.mz - cz, c) : 0.f;
    const float sh_r = up_r && st.mr != neg_inf() ? mul_rn(st.mr - cr, c) : 0.f;
    const float fz = sh_z != 0.f ? exp2_ftz(sh_z) : 1.f;
    const float fr = sh_r != 0.f ? exp2_ftz(sh_r) : 1.f;
    st.u = fz > 0.f ? fz * (st.u + st.sz * (sh_z - sh_r)) : 0.f;  // an underflowed weight drops its terms
    st.sz *= fz;
    st.sr *= fr;
    if (up_z) st.mz = cz;
    if (up_r) st.mr = cr;
  }
  const float zref = st.mz == neg_inf() ? 0.f : st.mz;
  const float rref = st.mr == neg_inf() ? 0.f : st.mr;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float dz = mul_rn(z[u][j] - zref, c);  // mul_rn: dz - dr is exactly 0 for equal rows
      const float dr = mul_rn(r[u][j] - rref, c);  // -inf where q = 0: a live p there makes u = +inf
      const float e = exp2_ftz(dz);
      st.sz += e;
      st.sr += exp2_ftz(dr);
      st.u = fmaf(e, e > 0.f ? dz - dr : 0.f, st.u);  // p = 0 adds 0 even where dz - dr is infinite
    }
  }
}

RK_HD void kl_fold(KlStats& out, const KlStats& x, float c) {
  if (x.sz != 0.f) {
    const float dmz = mul_rn(x.mz - out.mz, c);
    const float wz = exp2_ftz(dmz);
    out.sz += wz * x.sz;
    // equal reference maxima shift by 0, both -inf too: a part of the row whose q is 0 throughout, folded into a
    // state that has seen no live q either, keeps its u (+inf where p lives) instead of (-inf) - (-inf) = NaN
    const float dmr = x.mr == out.mr ? 0.f : mul_rn(x.mr - out.mr, c);
    if (wz > 0.f) out.u += wz * (x.u + x.sz * (dmz - dmr));
  }
  if (x.sr != 0.f) out.sr += exp2_ftz((x.mr - out.mr) * c) * x.sr;
}

RK_HD KlStats kl_merge(const KlStats& a, const KlStats& b, float c) {
  KlStats out{fmaxf(a.mz, b.mz), 0.f, fmaxf(a.mr, b.mr), 0.f, 0.f};
  kl_fold(out, a, c);
  kl_fold(out, b, c);
  return out;
}

struct KlSummary {
  float kl, lse_z, lse_r;
};

RK_HD KlSummary kl_finish(const KlStats& st, float inv_t) {
  const float log_sz = logf(st.sz), log_sr = logf(st.sr);
  // the maxima / T rounded on their own, as the backward's z = x / T (see stats_finish)
  return {kLn2 * (st.u / st.sz) - log_sz + log_sr, mul_rn(st.mz, inv_t) + log_sz, mul_rn(st.mr, inv_t) + log_sr};
}

// The reference row's values at the policy row's vector k (a whole vector): one 16-byte load
// when the two rows are co-aligned, else element by element.
template <typename T>
RK_HD void load_ref_body(const T* ref_row, const uint4* ref_vecs, bool co_aligned, int64_t k, int64_t pre,
                         float (&r)[Vec<T>::kSize]) {
  constexpr int kVec = Vec<T>::kSize;
  if (co_aligned) {
    vec_to_floats(load_vec(ref_vecs + k), r, T{});
  } else {
    const int64_t c0 = k * kVec - pre;
#pragma unroll
    for (int j = 0; j < kVec; ++j) r[j] = to_float(ref_row[c0 + j]);
  }
}

// This thread's KL state over the vectors of the policy row x (its address framing), the
// reference row read at the same columns; thread `first` of `step` (head / tail by first == 0).
template <typename T, int kUnroll>
RK_HD KlStats sweep_kl_stats(const T* x, const T* xr, int64_t V, int64_t first, int64_t step, float c) {
  constexpr int kVec = Vec<T>::kSize;
  const RowVecs rv = row_vecs(x, V);
  const VecRange body = split_vecs(rv, 0, rv.count);
  const uint4* vecs = reinterpret_cast<const uint4*>(x - rv.pre);
  // co-aligned in practice (both rows from tensors of one shape); the check keeps other views correct
  const bool co_aligned = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(xr)) & 15u) == 0;
  const uint4* ref_vecs = reinterpret_cast<const uint4*>(xr - rv.pre);
  KlStats st = kl_init();
  // the partial head (thread 0) and tail (thread step - 1) vectors, element by element
  const auto partial = [&](int64_t k) {
    const uint4 raw_z = load_vec_masked(x, k, rv.pre, V), raw_r = load_vec_masked(xr, k, rv.pre, V);
    float z[1][kVec], r[1][kVec];
    masked_to_floats<T>(raw_z, k, rv.pre, V, z[0]);
    masked_to_floats<T>(raw_r, k, rv.pre, V, r[0]);
    kl_update(st, z, r, c);
  };
  if (first == 0 && body.body_lo > 0) partial(0);
  if (first == step - 1 && body.body_hi < rv.count) partial(rv.count - 1);
  int64_t k = body.body_lo + first;
  for (; k + (kUnroll - 1) * step < body.body_hi; k += kUnroll * step) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = load_vec(vecs + k + u * step);
    float z[kUnroll][kVec], r[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_ref_body(xr, ref_vecs, co_aligned, k + u * step, rv.pre, r[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) vec_to_floats(raw[u], z[u], T{});
    kl_update(st, z, r, c);
  }
  for (; k < body.body_hi; k += step) {
    float z[1][kVec], r[1][kVec];
    vec_to_floats(load_vec(vecs + k), z[0], T{});
    load_ref_body(xr, ref_vecs, co_aligned, k, rv.pre, r[0]);
    kl_update(st, z, r, c);
  }
  return st;
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
