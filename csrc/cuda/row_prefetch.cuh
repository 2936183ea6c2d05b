// Sweep 1 of the fused PPO forward-with-gradient when its row slice lives in shared memory (ppo.cu's
// kShared and kCluster paths), with the slice copied in by cp.async, many vectors in flight per thread.
//
// Why: those paths hold a slice of up to ~110 KB per CTA in shared memory, so only two CTAs fit on an
// SM. The register sweep (sweep_row_stats) keeps kUnroll = 4 vectors in flight per thread. At 256
// threads that is 16 KB per CTA and 32 KB per SM, about what an SM must keep in flight to draw its
// share of HBM bandwidth (~4.3 TB/s / 132 SMs x ~0.8 us). The H200 run put this path at ~75% of the
// copy bandwidth while the register-only forward, four times more CTAs per SM, reached 97.7%
// (benchmarks/results/nvidia-h200/NOTES.md). cp.async (sm_80+) copies global to shared memory without
// a register, so a thread can have kDepth groups of kUnroll vectors in flight (64 KB per CTA at 256
// threads, kDepth = 4) while it folds the oldest group into its statistics.
//
// Same arithmetic and order as sweep_row_stats: each thread folds the same vectors, grouped the same way
// (whole groups of kUnroll, then the remainder one by one), so the statistics are bit-identical, and the
// cache ends up holding every vector of [k_lo, k_hi) exactly as the register sweep's sink writes it.
// A thread reads back only the vectors it copied itself (visible to it once its cp.async.wait_group
// returns); the block reduction that follows ends with __syncthreads, after which sweep 2 reads any.
// On the host (the CPU emulation, tests/cuda/row_stats_emulation.cpp) the copies are plain stores.
#pragma once

#include "row_stats.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace detail {

// Groups of 4 vectors in flight per thread in the fused PPO kernel: 64 KB per 256-thread CTA.
constexpr int kPrefetchDepth = 4;

// One 16-byte global -> shared copy, asynchronous on sm_80+.
RK_HD void copy_vec_async(uint4* dst_shared, const uint4* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(dst_shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
#else
  *dst_shared = load_vec(src);
#endif
}

// Closes the group of copies issued since the last commit (cp.async.commit_group).
RK_HD void commit_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
RK_HD void wait_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Statistics of vectors [k_lo, k_hi) of the row for thread `first` of `step`, copying each vector k to
// cache[k - k_lo] (shared memory): sweep_row_stats with an on_vec sink that caches, and the body's loads
// replaced by a kDepth-deep pipeline of cp.async groups.
template <typename T, int kUnroll, int kDepth>
RK_HD RowStats sweep_row_stats_prefetch(const T* row, const RowVecs& rv, int64_t V, int64_t k_lo, int64_t k_hi,
                                        int64_t first, int64_t step, float c, uint4* cache) {
  static_assert(kDepth >= 1 && kDepth <= 8, "cp.async.wait_group takes 0..7 pending groups");
  constexpr int kVec = Vec<T>::kSize;
  const VecRange body = split_vecs(rv, k_lo, k_hi);
  const uint4* vecs = reinterpret_cast<const uint4*>(row - rv.pre);
  RowStats st = stats_init();
  fold_partial_vecs(st, row, rv, V, k_lo, k_hi, body, first, step, c,
                    [cache, k_lo](int64_t k, const uint4& raw) { cache[k - k_lo] = raw; });
  // this thread's body vectors: k = start + j·step, j in [0, n), in groups g of kUnroll consecutive j
  const int64_t start = body.body_lo + first;
  const int64_t n = start < body.body_hi ? (body.body_hi - start + step - 1) / step : 0;
  const int64_t groups = (n + kUnroll - 1) / kUnroll;
  const auto issue = [&](int64_t g) {  // a group past the end commits nothing, keeping the count in step
    const int64_t j0 = g * kUnroll;
    if (j0 + kUnroll <= n) {
      // a whole group (all but the last): one bound test and one address computation for its kUnroll copies,
      // where testing and addressing each vector on its own had cost ~17 instructions per 16-byte copy
      const int64_t k0 = start + j0 * step;
      const uint4* src = vecs + k0;
      uint4* dst = cache + (k0 - k_lo);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) copy_vec_async(dst + u * step, src + u * step);
    } else {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u;
        if (j < n) {
          const int64_t k = start + j * step;
          copy_vec_async(cache + (k - k_lo), vecs + k);
        }
      }
    }
    commit_copies();
  };
#pragma unroll
  for (int g = 0; g < kDepth - 1; ++g) issue(g);
  for (int64_t g = 0; g < groups; ++g) {
    issue(g + kDepth - 1);
    wait_copies<kDepth - 1>();  // group g has landed: only the kDepth - 1 newer ones may be in flight
    const int64_t j0 = g * kUnroll;
    if (j0 + kUnroll <= n) {  // a whole group: one stats_update of kUnroll vectors, as sweep_row_stats
      float x[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) vec_to_floats(cache[start + (j0 + u) * step - k_lo], x[u], T{});
      stats_update(st, x, c);
    } else {  // the remainder, one vector at a time
      for (int64_t j = j0; j < n; ++j) {
        float x[1][kVec];
        vec_to_floats(cache[start + j * step - k_lo], x[0], T{});
        stats_update(st, x, c);
      }
    }
  }
  wait_copies<0>();  // nothing of this thread's left in flight (the trailing groups are empty)
  return st;
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
