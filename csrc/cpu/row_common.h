// Shared pieces of the CPU row kernels (logprobs.cpp, kl.cpp): the vocabulary chunk walked at a time, the
// exp used, widening a chunk to the accumulation type, its maximum, and the buffers' page advice.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "logprobs.h"

namespace rlhf_kernels {
namespace cpu {
namespace detail {

// The vocabulary is walked in chunks of 2048 (8 KiB of fp32, L1-resident): each
// chunk comes from memory once and is re-read from cache by the second loop.
constexpr int64_t kChunk = 2048;

template <typename scalar_t>
using acc_type_t = float_or_double_t<scalar_t>;

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// exp: ATen's fast polynomial for float (<= 20 ulp, ~1e-6 relative: well inside the fp32
// tolerance; it clamps NaN to a finite value, so callers track NaN themselves), std::exp per lane
// for double (the gradcheck path; not Sleef's vector exp, whose symbol for each ISA the extension
// would then need from libtorch_cpu).
inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& x) { return x.exp_u20(); }
inline at::vec::Vectorized<double> fast_exp(const at::vec::Vectorized<double>& x) {
  return x.map([](double v) { return std::exp(v); });
}

// The chunk x[0:n] in the accumulation type: the row itself when it already is
// (no copy), else converted into buf (bf16 / fp16 -> fp32, vectorised by the compiler).
template <typename scalar_t, typename acc_t>
inline const acc_t* chunk_source(const scalar_t* x, int64_t n, acc_t* buf) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(x[i]);
    return buf;
  }
}

// NaN-propagating max of src[0:n].
template <typename acc_t>
inline acc_t chunk_max(const acc_t* src, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec vmax(neg_inf<acc_t>());
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(src + i));
  if (i < n) {
    const int64_t rest = n - i;
    vmax = at::vec::maximum(vmax, Vec::set(Vec(neg_inf<acc_t>()), Vec::loadu(src + i, rest), rest));
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
}

// A fresh [N, V] gradient is mostly first-touch page faults (4 KiB each, zeroed by the
// kernel): ~130 ms of a 150 ms backward at N=2048, V=50257 fp32. Asking for transparent
// huge pages on the buffer (honoured when THP is "madvise" or "always") cuts that ~5x.
// `t` may be strided (rows of a larger gradient): the advice covers its first to last element.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.numel() == 0) return;
  int64_t last_elem = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last_elem += (t.size(d) - 1) * t.stride(d);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(last_elem + 1) * t.element_size();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advisory: failure is harmless
  }
#else
  (void)t;
#endif
}

// Row `row` of a [B, T, V] tensor viewed as B·T rows (T = rows_inner) with strides (outer, inner).
template <typename T>
inline T* row_at(T* base, int64_t row, int64_t rows_inner, int64_t stride_outer, int64_t stride_inner) {
  return base + (row / rows_inner) * stride_outer + (row % rows_inner) * stride_inner;
}

inline int64_t grain_for(int64_t vocab) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
}

}  // namespace detail
}  // namespace cpu
}  // namespace rlhf_kernels
