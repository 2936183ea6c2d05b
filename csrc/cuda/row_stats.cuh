// One sweep over a row of logits: the online softmax statistics of z = x / T, and the two-row
// state of the exact KL. Shared by the forward kernels (logprobs.cu, ppo.cu, kl.cu) and, compiled
// for the host, by the CPU emulation of those kernels (tests/cuda/row_stats_emulation.cu), which
// checks this arithmetic and the vector framing against the float64 oracle on machines without a GPU.
// CUDA headers only; every function here is __host__ __device__.
//
// Units. A thread keeps the running maximum m of the *raw* logits x (the maximum of x / T is
// m / T, as T > 0) and works in base 2 with c = log2(e) / T:
//   d = (x - m)·c,   e = 2^d = exp((x - m) / T),   s = Σ e,   t = Σ e·d   (t in bits).
// Per value that is: one subtract, one multiply, one ex2 (MUFU.EX2, flushing results below 2^-126
// to zero: a term that small cannot move a sum that holds the row's maximum, e = 1), one add, and
// for t a max + fma. The previous form (scale each value by 1/T, then __expf, whose subnormal
// handling costs a compare and two predicated multiplies, and per-vector bounds checks) issued
// about 17 instructions per bf16 value against 9 here; at H100 bandwidth the forward must retire
// ~5.7 values per clock per SM, ~22 issue slots per value (benchmarks/results/sass-sm90/).
// (x - m) before the scale keeps the difference exact for 16-bit inputs, so |x| ~ 1e4 loses nothing.
//
// Results: lse = m/T + log s, entropy = log s - ln2·t/s, logp(y) = (x_y/T - m/T) - log s.
// -inf logits add exactly 0 (also to t: the max(d, -FLT_MAX) floor keeps 0·(-inf) out); a NaN logit
// is skipped by the maximum but makes s NaN, so it reaches its own row's outputs only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#define RK_HD __host__ __device__ __forceinline__

namespace rlhf_kernels {
namespace cuda {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

RK_HD float float_from_bits(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// a·b rounded, never fused into an FMA with the add that consumes it: where two products must
// cancel exactly (the KL of equal rows), a fused one leaves its rounding residue behind.
RK_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  volatile float product = a * b;  // the host emulation may be built with FMA contraction on
  return product;
#endif
}

RK_HD float neg_inf() { return float_from_bits(0xff800000u); }
RK_HD float nan_f() { return float_from_bits(0x7fc00000u); }

// 2^x with results below 2^-126 flushed to +0 (one MUFU.EX2 on the GPU; the host
// emulation flushes the same range).
RK_HD float exp2_ftz(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = std::exp2(x);
  return y < FLT_MIN ? 0.f : y;
#endif
}

RK_HD float to_float(float v) { return v; }
RK_HD float to_float(__half v) { return __half2float(v); }
RK_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  union {
    uint4 raw;
    T elems[kSize];
  };
};

// The kVec values of one 16-byte vector as floats. bf16 is the top half of a float, so each
// value is one shift or one mask of its 32-bit word (the compiler's generic conversion spends
// two instructions on every odd element).
RK_HD void vec_to_floats(const uint4& raw, float (&x)[8], __nv_bfloat16) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = float_from_bits(w[i] << 16);
    x[2 * i + 1] = float_from_bits(w[i] & 0xffff0000u);
  }
}
RK_HD void vec_to_floats(const uint4& raw, float (&x)[8], __half) {
  Vec<__half> v;
  v.raw = raw;
#pragma unroll
  for (int j = 0; j < 8; ++j) x[j] = __half2float(v.elems[j]);
}
RK_HD void vec_to_floats(const uint4& raw, float (&x)[4], float) {
  x[0] = float_from_bits(raw.x);
  x[1] = float_from_bits(raw.y);
  x[2] = float_from_bits(raw.z);
  x[3] = float_from_bits(raw.w);
}

// A whole 16-byte vector through the read-only path (__ldg on the GPU).
RK_HD uint4 load_vec(const uint4* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// Geometry of one row in the address-aligned vector framing: with pre = (address of column 0
// % 16) / sizeof(T), vector k covers columns [k·kVec - pre, (k+1)·kVec - pre). Vectors in
// [whole_lo, whole_hi) lie inside [0, V) and are single 16-byte loads; at most the first and
// the last vector are partial and are read element by element, so nothing outside [0, V) is read.
struct RowVecs {
  int64_t pre;       // elements of vector 0 that lie before column 0
  int64_t count;     // vectors touching [0, V)
  int64_t whole_lo;  // first whole vector (0 or 1)
  int64_t whole_hi;  // one past the last whole vector (may be < whole_lo for tiny V)
};

template <typename T>
RK_HD RowVecs row_vecs(const T* row, int64_t V) {
  constexpr int kVec = Vec<T>::kSize;
  const int64_t pre = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) & 15u) / sizeof(T));
  return {pre, (V + pre + kVec - 1) / kVec, pre > 0 ? 1 : 0, (V + pre) / kVec};
}

// Vectors a row of V elements can touch whatever its alignment, before the row's address is known
// (launch geometry, the PPO cluster's per-CTA slices): +1 as a misaligned start splits one vector in two.
template <typename T>
RK_HD int64_t vectors_per_row(int64_t vocab) {
  constexpr int kVec = Vec<T>::kSize;
  return (vocab + kVec - 1) / kVec + 1;
}

// Vector k of the row when it is partial, element by element: raw elements outside [0, V) are zero.
template <typename T>
RK_HD uint4 load_vec_masked(const T* row, int64_t k, int64_t pre, int64_t V) {
  constexpr int kVec = Vec<T>::kSize;
  Vec<T> v;
  v.raw = uint4{0u, 0u, 0u, 0u};
  const int64_t c0 = k * kVec - pre;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int64_t c = c0 + j;
    if (c >= 0 && c < V) v.elems[j] = row[c];
  }
  return v.raw;
}

// The values of a partial vector k loaded by load_vec_masked; -inf outside [0, V) (adds nothing).
template <typename T>
RK_HD void masked_to_floats(const uint4& raw, int64_t k, int64_t pre, int64_t V, float (&x)[Vec<T>::kSize]) {
  constexpr int kVec = Vec<T>::kSize;
  Vec<T> v;
  v.raw = raw;
  const int64_t c0 = k * kVec - pre;
#pragma unroll
  for (int j = 0; j < kVec; ++j) x[j] = (c0 + j >= 0 && c0 + j < V) ? to_float(v.elems[j]) : neg_inf();
}

// Splits the vectors [k_lo, k_hi) of a row into head, body (whole vectors) and tail: head =
// [k_lo, body_lo) and tail = [body_hi, k_hi) hold at most one (partial) vector each.
struct VecRange {
  int64_t body_lo, body_hi;
};

RK_HD VecRange split_vecs(const RowVecs& rv, int64_t k_lo, int64_t k_hi) {
  const int64_t lo = k_lo > rv.whole_lo ? k_lo : rv.whole_lo;
  const int64_t body_lo = lo < k_hi ? lo : k_hi;
  const int64_t hi = k_hi < rv.whole_hi ? k_hi : rv.whole_hi;
  return {body_lo, hi > body_lo ? hi : body_lo};
}

// ---------------------------------------------------------------- one-row softmax statistics

struct RowStats {
  float m, s, t;  // max raw logit; Σ 2^d; Σ 2^d·d (d = (x - m)·c)
};

RK_HD RowStats stats_init() { return {neg_inf(), 0.f, 0.f}; }

// Folds U x N raw values into the state: the maximum rises once for the whole group.
template <int U, int N>
RK_HD void stats_update(RowStats& st, const float (&x)[U][N], float c) {
  float cm = x[0][0];
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int j = 0; j < N; ++j) cm = fmaxf(cm, x[u][j]);  // NaN is skipped here but reaches s below
  if (cm > st.m) {
    if (st.m != neg_inf()) {
      const float shift = (st.m - cm) * c;
      const float f = exp2_ftz(shift);
      st.t = (st.t + st.s * shift) * f;
      st.s *= f;
    }
    st.m = cm;
  }
  // while every value so far is -inf, 0 is the reference: -inf adds 0, NaN adds NaN
  const float ref = st.m == neg_inf() ? 0.f : st.m;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float d = (x[u][j] - ref) * c;
      const float e = exp2_ftz(d);
      st.s += e;
      st.t = fmaf(e, fmaxf(d, -FLT_MAX), st.t);  // 0·(-inf) would be NaN: the floor keeps it 0
    }
  }
}

// Merges b into a (associative; the reduction tree fixes the order, so every thread that
// merges the same states gets the same bits).
RK_HD RowStats stats_merge(const RowStats& a, const RowStats& b, float c) {
  const float M = fmaxf(a.m, b.m);
  RowStats out{M, 0.f, 0.f};
  if (M == neg_inf()) {  // both empty (or NaN-only): the sums carry any NaN
    out.s = a.s + b.s;
    out.t = a.t + b.t;
    return out;
  }
  if (a.s != 0.f) {  // a part that saw only -inf has s == 0 and m == -inf: skip its 0·inf
    const float d = (a.m - M) * c;
    const float w = exp2_ftz(d);
    out.s += w * a.s;
    if (w > 0.f) out.t += w * (a.t + a.s * d);
  }
  if (b.s != 0.f) {
    const float d = (b.m - M) * c;
    const float w = exp2_ftz(d);
    out.s += w * b.s;
    if (w > 0.f) out.t += w * (b.t + b.s * d);
  }
  return out;
}

// What the kernels write from a row's merged statistics.
struct RowSummary {
  float m;  // max of z = x / T
  float log_s, lse, entropy;
};

// m = max x / T rounded on its own (mul_rn), like z = x / T in target_logp and the backward, so the
// top logit's log-prob is exactly -log s (a fused product would leave its residue, e.g. logp > 0).
RK_HD RowSummary stats_finish(const RowStats& st, float inv_t) {
  const float m = mul_rn(st.m, inv_t);
  const float log_s = logf(st.s);
  return {m, log_s, m + log_s, log_s - kLn2 * (st.t / st.s)};
}

// The target's logit row[y] as a float, 0 where y is ignore_index or outside [0, V) (never read). A kernel
// loads it before its block reduction, so the read's latency overlaps the reduction instead of following it.
template <typename T>
RK_HD float target_value(const T* row, int64_t y, int64_t V, int64_t ignore_index) {
  return (y != ignore_index && y >= 0 && y < V) ? to_float(row[y]) : 0.f;
}

// log p of the target column y from its logit xy = row[y], or NaN for a y outside [0, V).
RK_HD float target_logp(float xy, int64_t y, int64_t V, float inv_t, const RowSummary& r) {
  return (y >= 0 && y < V) ? (mul_rn(xy, inv_t) - r.m) - r.log_s : nan_f();
}

// What a row's token gets from its merged statistics: log p of the target, the entropy (both 0
// where y == ignore_index) and the row's lse (always written; the backward reads it).
struct TokenOutputs {
  float logp, entropy, lse;
  bool valid;
};

// xy: the target's logit, target_value(row, y, V, ignore_index).
RK_HD TokenOutputs token_outputs_at(float xy, int64_t y, int64_t V, float inv_t, int64_t ignore_index,
                                    const RowStats& st) {
  const RowSummary r = stats_finish(st, inv_t);
  const bool valid = y != ignore_index;
  return {valid ? target_logp(xy, y, V, inv_t, r) : 0.f, valid ? r.entropy : 0.f, r.lse, valid};
}

template <typename T>
RK_HD TokenOutputs token_outputs(const T* row, int64_t y, int64_t V, float inv_t, int64_t ignore_index,
                                 const RowStats& st) {
  return token_outputs_at(target_value(row, y, V, ignore_index), y, V, inv_t, ignore_index, st);
}

// The partial head and tail vectors of [k_lo, k_hi) (body = split_vecs(rv, k_lo, k_hi)), read element by
// element: thread 0 folds the head into st, thread step - 1 the tail, each also handed to on_vec(k, raw).
template <typename T, typename OnVec>
RK_HD void fold_partial_vecs(RowStats& st, const T* row, const RowVecs& rv, int64_t V, int64_t k_lo, int64_t k_hi,
                             const VecRange& body, int64_t first, int64_t step, float c, OnVec on_vec) {
  constexpr int kVec = Vec<T>::kSize;
  const auto partial = [&](int64_t k) {
    const uint4 raw = load_vec_masked(row, k, rv.pre, V);
    float x[1][kVec];
    masked_to_floats<T>(raw, k, rv.pre, V, x[0]);
    on_vec(k, raw);
    stats_update(st, x, c);
  };
  if (first == 0 && k_lo < body.body_lo) partial(k_lo);
  if (first == step - 1 && body.body_hi < k_hi) partial(k_hi - 1);
}

// This thread's statistics of vectors [k_lo, k_hi) of the row: it takes the body vectors
// first, first + step, ... (kUnroll 16-byte loads in flight, one max update per group); thread 0
// also takes the partial head vector and thread step - 1 the partial tail (element loads; two
// threads, so no warp waits on both). on_vec(k, raw) sees every vector once (ppo.cu caches the
// row in shared memory through it). Loading the partial vectors ahead of the body and folding them
// in after it would hide their latency, but costs registers the PPO kernel's 64-register bound spills.
template <typename T, int kUnroll, typename OnVec>
RK_HD RowStats sweep_row_stats(const T* row, const RowVecs& rv, int64_t V, int64_t k_lo, int64_t k_hi,
                               int64_t first, int64_t step, float c, OnVec on_vec) {
  constexpr int kVec = Vec<T>::kSize;
  const VecRange body = split_vecs(rv, k_lo, k_hi);
  // vector k of the row is vecs[k]: row - pre is 16-byte aligned (only whole vectors are read through it)
  const uint4* vecs = reinterpret_cast<const uint4*>(row - rv.pre);
  RowStats st = stats_init();
  fold_partial_vecs(st, row, rv, V, k_lo, k_hi, body, first, step, c, on_vec);
  int64_t k = body.body_lo + first;
  for (; k + (kUnroll - 1) * step < body.body_hi; k += kUnroll * step) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = load_vec(vecs + k + u * step);
    float x[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      on_vec(k + u * step, raw[u]);
      vec_to_floats(raw[u], x[u], T{});
    }
    stats_update(st, x, c);
  }
  for (; k < body.body_hi; k += step) {
    const uint4 raw = load_vec(vecs + k);
    on_vec(k, raw);
    float x[1][kVec];
    vec_to_floats(raw, x[0], T{});
    stats_update(st, x, c);
  }
  return st;
}

struct NoVecSink {
  RK_HD void operator()(int64_t, const uint4&) const {}
};

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
