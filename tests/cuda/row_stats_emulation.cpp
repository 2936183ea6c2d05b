// The row sweeps of csrc/cuda (row_stats.cuh, kl_stats.cuh, row_grad.cuh) run on the CPU, thread
// by thread, so their arithmetic and vector framing are checked against the float64 oracle on
// machines without a GPU (tests/cuda/test_row_stats_emulation.py builds this file with nvcc as host code
// and calls it through ctypes).
//
// Also the per-token arithmetic of the fused PPO kernels (token_terms.cuh: the clipped surrogate, the KL
// estimators and their derivatives), token by token, and thread 0's end of each PPO row (ppo_term.cuh:
// finish_ppo_row, from the row's statistics to its outputs and sweep 2's coefficients).
// What is emulated exactly: each thread's sweep (the same template the kernels call, with the
// same first / step / head-tail split and kUnroll), block_reduce's tree (butterfly over the 32
// lanes of each warp, then warp 0 over the warp results), the cluster's rank-order merge
// (ppo.cu), the per-CTA vector slices, and what the kernels write from the merged state; the
// logprobs backward's (row, column-split) grid, and the fused PPO kernel's second sweep from its
// shared-memory copy of the row or from the logits again.
// What is not: the GPU's approximate ex2 (exp2 here; both flush results below 2^-126) and
// the memory system.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kl_grad.cuh"
#include "kl_stats.cuh"
#include "ppo_aggregate.cuh"
#include "row_bulk.cuh"
#include "row_grad.cuh"
#include "row_pipeline.cuh"
#include "row_prefetch.cuh"
#include "row_stats.cuh"
#include "ppo_term.cuh"
#include "token_terms.cuh"

using namespace rlhf_kernels::cuda::detail;

namespace {

// write_row_range's Stash here: the kernels' SharedStash (row_common.cuh), one slot, as the emulation runs one
// thread at a time. kPreload as there: the logprobs backward's owner thread reads the target's z itself; the PPO
// paths have it put by "thread 0" from the target's logit before sweep 2, as their kernels do.
template <bool kPreloadIt>
struct HostStash {
  static constexpr bool kPreload = kPreloadIt;
  static float& slot() {
    static float z = 0.f;
    return z;
  }
  static void put(float z) { slot() = z; }
  static float get() { return slot(); }
};

template <typename S, typename Merge>
S warp_reduce(S* lanes, Merge merge) {
  for (int off = 16; off > 0; off >>= 1) {
    S next[32];
    for (int i = 0; i < 32; ++i) next[i] = merge(lanes[i], lanes[i ^ off]);
    for (int i = 0; i < 32; ++i) lanes[i] = next[i];
  }
  return lanes[0];
}

// block_reduce of row_common.cuh: threads is a multiple of 32, at most 1024.
template <typename S, typename Merge>
S block_reduce_emulated(std::vector<S> states, S identity, Merge merge) {
  const int warps = static_cast<int>(states.size()) / 32;
  S slots[32];
  for (int w = 0; w < 32; ++w) slots[w] = w < warps ? warp_reduce(&states[32 * w], merge) : identity;
  return warp_reduce(slots, merge);
}

// One CTA's statistics: sweep(t) for each of its `threads` threads in turn, then block_reduce.
template <typename Sweep>
RowStats reduce_cta(int threads, float c, Sweep sweep) {
  std::vector<RowStats> states;
  for (int t = 0; t < threads; ++t) states.push_back(sweep(t));
  return block_reduce_emulated(states, stats_init(), [c](const RowStats& a, const RowStats& b) {
    return stats_merge(a, b, c);
  });
}

// One CTA of a forward kernel: `threads` threads sweep vectors [k_lo, k_hi) of the row, then block_reduce.
template <typename T, typename Sink>
RowStats cta_stats(const T* x, const RowVecs& rv, int64_t vocab, int64_t k_lo, int64_t k_hi, int threads, float c,
                   const Sink& sink) {
  return reduce_cta(threads, c, [&](int t) { return sweep_row_stats<T, 4>(x, rv, vocab, k_lo, k_hi, t, threads, c, sink); });
}

// Checks what the PPO kernel caches through on_vec: each vector of the slice exactly once, and
// its in-range elements equal to the row's.
template <typename T>
struct CacheCheck {
  const T* row;
  int64_t pre, vocab, k_lo;
  std::vector<int>* seen;
  bool* ok;
  void operator()(int64_t k, const uint4& raw) const {
    constexpr int kVec = Vec<T>::kSize;
    const int64_t i = k - k_lo;
    if (i < 0 || i >= static_cast<int64_t>(seen->size())) {
      *ok = false;
      return;
    }
    (*seen)[i] += 1;
    Vec<T> v;
    v.raw = raw;
    for (int j = 0; j < kVec; ++j) {
      const int64_t col = k * kVec - pre + j;
      if (col >= 0 && col < vocab && std::memcmp(&v.elems[j], &row[col], sizeof(T)) != 0) *ok = false;
    }
  }
};

// A forward kernel's statistics of row x: its `cluster` CTAs (one without a cluster) each sweep their slice with
// `threads` threads, merged in rank order. False when the PPO cache check failed.
template <typename T>
bool row_stats_of(const T* x, int64_t vocab, int threads, int cluster, float c, RowStats* total) {
  const int64_t per_cta = (vectors_per_row<T>(vocab) + cluster - 1) / cluster;
  const RowVecs rv = row_vecs(x, vocab);
  *total = stats_init();
  for (int rank = 0; rank < cluster; ++rank) {
    const int64_t k_lo = std::min<int64_t>(rank * per_cta, rv.count);
    const int64_t k_hi = std::min<int64_t>(k_lo + per_cta, rv.count);
    std::vector<int> seen(static_cast<size_t>(k_hi - k_lo), 0);
    bool ok = true;
    const CacheCheck<T> sink{x, rv.pre, vocab, k_lo, &seen, &ok};
    const RowStats cta = cta_stats(x, rv, vocab, k_lo, k_hi, threads, c, sink);
    for (const int n : seen) ok = ok && n == 1;
    if (!ok) return false;
    *total = stats_merge(*total, cta, c);
  }
  return true;
}

template <typename T>
int logprobs_rows(const T* logits, const int64_t* targets, int64_t rows, int64_t row_stride, int64_t vocab,
                  float inv_t, int64_t ignore_index, int threads, int cluster, float* logp, float* entropy,
                  float* lse) {
  const float c = inv_t * kLog2e;
  for (int64_t row = 0; row < rows; ++row) {
    const T* x = logits + row * row_stride;
    RowStats total;
    if (!row_stats_of(x, vocab, threads, cluster, c, &total)) return 1;
    const TokenOutputs out = token_outputs(x, targets[row], vocab, inv_t, ignore_index, total);
    logp[row] = out.logp;
    entropy[row] = out.entropy;
    lse[row] = out.lse;
  }
  return 0;
}

// ppo.cu's forward of a row: sweep 1's statistics (as logprobs_rows), then thread 0's finish_ppo_row
// (ppo_term.cuh) with the row's scalars: the per-token outputs, and with weights the coefficients tok[4·row ...]
// (lse, entropy, G_logp, G_H) that sweep 2 writes dlogits from.
template <typename T>
int ppo_rows(const T* logits, const int64_t* targets, int64_t rows, int64_t row_stride, int64_t vocab, int threads,
             int cluster, const rlhf_kernels::cuda::PpoParams& p, const PpoOutputs& io, float* tok) {
  const float c = p.inv_t * kLog2e;
  const bool with_grad = io.weights != nullptr;
  for (int64_t row = 0; row < rows; ++row) {
    const T* x = logits + row * row_stride;
    RowStats total;
    if (!row_stats_of(x, vocab, threads, cluster, c, &total)) return 1;
    const int64_t y = targets[row];
    const RowScalars scalars = load_row_scalars(io, row, p, with_grad);
    finish_ppo_row(target_value(x, y, vocab, p.ignore_index), y, vocab, total, scalars, p, io, row, true, with_grad,
                   with_grad ? tok + 4 * row : nullptr);
  }
  return 0;
}

template <typename T>
int kl_rows(const T* logits, const T* ref_logits, int64_t rows, int64_t row_stride, int64_t ref_row_stride,
            int64_t vocab, float inv_t, int threads, float* kl, float* lse_z, float* lse_r) {
  const float c = inv_t * kLog2e;
  const auto merge = [c](const KlStats& a, const KlStats& b) { return kl_merge(a, b, c); };
  for (int64_t row = 0; row < rows; ++row) {
    const T* x = logits + row * row_stride;
    const T* xr = ref_logits + row * ref_row_stride;
    std::vector<KlStats> states;
    for (int t = 0; t < threads; ++t) states.push_back(sweep_kl_stats<T, 2>(x, xr, vocab, t, threads, c));
    const KlSummary r = kl_finish(block_reduce_emulated(states, kl_init(), merge), inv_t);
    kl[row] = r.kl;
    lse_z[row] = r.lse_z;
    lse_r[row] = r.lse_r;
  }
  return 0;
}

// The KL backward (kl.cu): CTA (row, split) writes columns [split·cols, (split+1)·cols) of dz (and dr when
// grad_r is not null) with `threads` threads, from the forward's kl, lse_z and lse_r; g = the upstream gradient.
template <typename T>
void kl_bwd_rows(T* grad_z, T* grad_r, const T* logits, const T* ref_logits, const float* g, const float* kl,
                 const float* lse_z, const float* lse_r, int64_t rows, int64_t row_stride, int64_t ref_row_stride,
                 int64_t grad_row_stride, int64_t vocab, float inv_t, int64_t cols_per_cta, int threads) {
  for (int64_t row = 0; row < rows; ++row) {
    const T* x = logits + row * row_stride;
    const T* xr = ref_logits + row * ref_row_stride;
    T* dz = grad_z + row * grad_row_stride;
    T* dr = grad_r != nullptr ? grad_r + row * grad_row_stride : nullptr;
    for (int64_t c_lo = 0; c_lo < vocab; c_lo += cols_per_cta) {
      const int64_t c_hi = std::min(c_lo + cols_per_cta, vocab);
      for (int t = 0; t < threads; ++t) {
        if (dr != nullptr) {
          write_kl_grad_range<T, true>(dz, dr, x, xr, c_lo, c_hi, t, threads, g[row] * inv_t, kl[row], lse_z[row],
                                       lse_r[row], inv_t);
        } else {
          write_kl_grad_range<T, false>(dz, dr, x, xr, c_lo, c_hi, t, threads, g[row] * inv_t, kl[row],
                                        lse_z[row], lse_r[row], inv_t);
        }
      }
    }
  }
}

// The logprobs backward: CTA (row, split) writes columns [split·cols, (split+1)·cols) with `threads` threads.
template <typename T>
void logprobs_bwd_rows(T* grad, const T* logits, const int64_t* targets, const float* g_logp, const float* g_ent,
                       const float* lse, const float* entropy, int64_t rows, int64_t row_stride,
                       int64_t grad_row_stride, int64_t vocab, float inv_t, int64_t ignore_index, int64_t cols_per_cta,
                       int threads) {
  for (int64_t row = 0; row < rows; ++row) {
    const T* x = logits + row * row_stride;
    T* dx = grad + row * grad_row_stride;
    const int64_t y = targets[row];
    const LogprobGrad f = make_logprob_grad(lse[row], entropy[row], g_logp[row], g_ent[row], inv_t);
    for (int64_t c_lo = 0; c_lo < vocab; c_lo += cols_per_cta) {
      const int64_t c_hi = std::min(c_lo + cols_per_cta, vocab);
      for (int t = 0; t < threads; ++t) {
        if (y == ignore_index) {
          zero_row_range(dx, c_lo, c_hi, t, threads);
        } else {
          write_row_range<HostStash<true>>(dx, x, c_lo, c_hi, inv_t, y, t, threads, f);
        }
      }
    }
  }
}

// The fused PPO kernel's log-prob gradient (ppo.cu): sweep 1 over each CTA's slice, caching it
// when in_smem, the slices merged, then sweep 2 writes G_logp·∂logp + G_H·∂H for the slice's
// columns from the cache (or from the logits). G_logp, G_H are given per row here.
template <typename T>
int fused_grad_rows(T* grad, const T* logits, const int64_t* targets, const float* g_logp, const float* g_ent,
                    int64_t rows, int64_t row_stride, int64_t grad_row_stride, int64_t vocab, float inv_t,
                    int64_t ignore_index, int threads, int cluster, int cache_mode, float* logp, float* entropy,
                    float* lse) {
  // cache_mode: 0 kGlobal (sweep 2 re-reads the logits), 1 the slice cached by the register sweep's sink,
  // 2 the slice copied by sweep_row_stats_prefetch (RLHF_KERNELS_CUDA_PREFETCH=1), 3 kL2 (kGlobal with the
  // second sweep walking each thread's vectors backwards); plus 4: sweep 2 through LogprobGradNoEntropy, as the
  // kernel's kNoEntropy launch (entropy_coef = 0; G_H is then 0 for every row); plus 8 (with 1 or 2): the slice
  // copied by sweep_row_stats_bulk (RLHF_KERNELS_CUDA_PREFETCH=bulk), its whole-vector body reset to NaN bytes
  // before each thread's sweep, so a thread that read a chunk it had not waited for (the copy arrives when a
  // thread waits) folds NaN
  const bool no_entropy = (cache_mode & 4) != 0;
  const bool bulk = (cache_mode & 8) != 0;
  cache_mode &= 3;
  if (bulk && cache_mode != 1 && cache_mode != 2) return 2;
  const bool in_smem = cache_mode == 1 || cache_mode == 2;
  constexpr int kVec = Vec<T>::kSize;
  const float c = inv_t * kLog2e;
  const int64_t per_cta = (vectors_per_row<T>(vocab) + cluster - 1) / cluster;
  for (int64_t row = 0; row < rows; ++row) {
    const T* x = logits + row * row_stride;
    T* dx = grad + row * grad_row_stride;
    const RowVecs rv = row_vecs(x, vocab);
    std::vector<std::vector<uint4>> caches(static_cast<size_t>(cluster));
    RowStats total = stats_init();
    for (int rank = 0; rank < cluster; ++rank) {
      const int64_t k_lo = std::min<int64_t>(rank * per_cta, rv.count);
      const int64_t k_hi = std::min<int64_t>(k_lo + per_cta, rv.count);
      std::vector<uint4>& cache = caches[static_cast<size_t>(rank)];
      cache.assign(static_cast<size_t>(std::max<int64_t>(k_hi - k_lo, 1)), uint4{0u, 0u, 0u, 0u});
      const auto sink = [&](int64_t k, const uint4& raw) { cache[static_cast<size_t>(k - k_lo)] = raw; };
      if (bulk) {
        const VecRange body = split_vecs(rv, k_lo, k_hi);
        const uint4 nan_bytes{~0u, ~0u, ~0u, ~0u};
        total = stats_merge(total, reduce_cta(threads, c, [&](int t) {
          std::fill(cache.begin() + (body.body_lo - k_lo), cache.begin() + (body.body_hi - k_lo), nan_bytes);
          return sweep_row_stats_bulk<T, 4>(x, rv, vocab, k_lo, k_hi, t, threads, c, cache.data(), nullptr);
        }), c);
      } else if (cache_mode == 2) {
        total = stats_merge(total, reduce_cta(threads, c, [&](int t) {
          return sweep_row_stats_prefetch<T, 4, kPrefetchDepth>(x, rv, vocab, k_lo, k_hi, t, threads, c, cache.data());
        }), c);
      } else {
        total = stats_merge(total, cta_stats(x, rv, vocab, k_lo, k_hi, threads, c, sink), c);
      }
    }
    const int64_t y = targets[row];
    const TokenOutputs out = token_outputs(x, y, vocab, inv_t, ignore_index, total);
    logp[row] = out.logp;
    entropy[row] = out.entropy;
    lse[row] = out.lse;
    const bool valid = out.valid;
    HostStash<false>::put(mul_rn(target_value(x, y, vocab, ignore_index), inv_t));  // thread 0's, before sweep 2
    const LogprobGrad f = make_logprob_grad(out.lse, out.entropy, g_logp[row], g_ent[row], inv_t);
    for (int rank = 0; rank < cluster; ++rank) {
      const int64_t k_lo = std::min<int64_t>(rank * per_cta, rv.count);
      const int64_t k_hi = std::min<int64_t>(k_lo + per_cta, rv.count);
      const int64_t c_lo = std::max<int64_t>(k_lo * kVec - rv.pre, 0);
      const int64_t c_hi = std::min<int64_t>(k_hi * kVec - rv.pre, vocab);
      const T* src = in_smem ? reinterpret_cast<const T*>(caches[static_cast<size_t>(rank)].data()) -
                                   (k_lo * kVec - rv.pre)
                             : x;
      for (int t = 0; t < threads; ++t) {
        if (!valid) {
          zero_row_range(dx, c_lo, c_hi, t, threads);
        } else {
          if (no_entropy) {
            write_row_range<HostStash<false>>(dx, src, c_lo, c_hi, inv_t, y, t, threads, LogprobGradNoEntropy(f),
                                              cache_mode == 3);
          } else {
            write_row_range<HostStash<false>>(dx, src, c_lo, c_hi, inv_t, y, t, threads, f, cache_mode == 3);
          }
        }
      }
    }
  }
  return 0;
}

// ppo.cu's kPipe: `n_clusters` persistent clusters of `cluster` CTAs; cluster q takes rows q, q + n_clusters, ...
// Each CTA holds two buffers of per_cta vectors (filled with 0xff bytes, NaN in every dtype, so a vector that was
// never staged shows up in the results), and per row does what the kernel does, in its order: store the partial
// vectors staged one row ago, stage the next row into the other buffer, sweep 1 from this buffer (every thread,
// then the block reduction), the rank-order merge with the target's logit taken from the slice that holds it,
// sweep 2 from this buffer.
template <typename T>
int pipe_grad_rows(T* grad, const T* logits, const int64_t* targets, const float* g_logp, const float* g_ent,
                   int64_t rows, int64_t row_stride, int64_t grad_row_stride, int64_t vocab, float inv_t,
                   int64_t ignore_index, int threads, int cluster, int n_clusters, float* logp, float* entropy,
                   float* lse) {
  constexpr int kVec = Vec<T>::kSize;
  const float c = inv_t * kLog2e;
  const int64_t per = (vectors_per_row<T>(vocab) + cluster - 1) / cluster;
  const auto bounds = [&](const RowVecs& rv, int rank) {
    const int64_t lo = std::min<int64_t>(rank * per, rv.count);
    return std::pair<int64_t, int64_t>(lo, std::min<int64_t>(lo + per, rv.count));
  };
  const StagedPartials none{uint4{0u, 0u, 0u, 0u}, uint4{0u, 0u, 0u, 0u}, -1, -1};
  for (int q = 0; q < n_clusters; ++q) {
    const uint4 nan_bytes{~0u, ~0u, ~0u, ~0u};
    std::vector<std::vector<uint4>> buffers(static_cast<size_t>(cluster),
                                            std::vector<uint4>(static_cast<size_t>(2 * per), nan_bytes));
    std::vector<std::vector<StagedPartials>> staged(static_cast<size_t>(cluster),
                                                    std::vector<StagedPartials>(static_cast<size_t>(threads), none));
    const auto buffer = [&](int rank, int64_t i) { return buffers[static_cast<size_t>(rank)].data() + (i & 1) * per; };
    const auto stage_row = [&](int64_t r, int64_t i) {
      const T* x = logits + r * row_stride;
      const RowVecs rv = row_vecs(x, vocab);
      for (int rank = 0; rank < cluster; ++rank) {
        const auto [lo, hi] = bounds(rv, rank);
        for (int t = 0; t < threads; ++t) {
          staged[static_cast<size_t>(rank)][static_cast<size_t>(t)] =
              stage_slice(buffer(rank, i), x, rv, vocab, lo, hi, t, threads);
        }
      }
    };
    int64_t row = q;
    if (row < rows) stage_row(row, 0);
    for (int64_t i = 0; row < rows; ++i, row += n_clusters) {
      const T* x = logits + row * row_stride;
      T* dx = grad + row * grad_row_stride;
      const RowVecs rv = row_vecs(x, vocab);
      for (int rank = 0; rank < cluster; ++rank) {
        for (const StagedPartials& s : staged[static_cast<size_t>(rank)]) store_partial_vecs(buffer(rank, i), s);
      }
      if (row + n_clusters < rows) {
        stage_row(row + n_clusters, i + 1);
      } else {
        for (auto& per_rank : staged) std::fill(per_rank.begin(), per_rank.end(), none);
      }
      const int64_t y = targets[row];
      const int owner = target_owner(y, vocab, ignore_index, rv.pre, kVec, per);
      RowStats total = stats_init();
      float xy = 0.f;
      for (int rank = 0; rank < cluster; ++rank) {
        const auto [lo, hi] = bounds(rv, rank);
        total = stats_merge(total, reduce_cta(threads, c, [&](int t) {
          return sweep_slice_stats<T, 4>(buffer(rank, i), rv, vocab, lo, hi, t, threads, c);
        }), c);
        if (owner == rank) xy = to_float((reinterpret_cast<const T*>(buffer(rank, i)) - (lo * kVec - rv.pre))[y]);
      }
      const TokenOutputs out = token_outputs_at(xy, y, vocab, inv_t, ignore_index, total);
      logp[row] = out.logp;
      entropy[row] = out.entropy;
      lse[row] = out.lse;
      HostStash<false>::put(mul_rn(xy, inv_t));  // thread 0's, before sweep 2
      const LogprobGrad f = make_logprob_grad(out.lse, out.entropy, g_logp[row], g_ent[row], inv_t);
      for (int rank = 0; rank < cluster; ++rank) {
        const auto [lo, hi] = bounds(rv, rank);
        const int64_t c_lo = std::max<int64_t>(lo * kVec - rv.pre, 0);
        const int64_t c_hi = std::min<int64_t>(hi * kVec - rv.pre, vocab);
        const T* src = reinterpret_cast<const T*>(buffer(rank, i)) - (lo * kVec - rv.pre);
        for (int t = 0; t < threads; ++t) {
          if (y == ignore_index) {
            zero_row_range(dx, c_lo, c_hi, t, threads);
          } else {
            write_row_range<HostStash<false>>(dx, src, c_lo, c_hi, inv_t, y, t, threads, f);
          }
        }
      }
    }
  }
  return 0;
}

bool bad_launch(int threads, int cluster) { return threads < 32 || threads > 1024 || threads % 32 != 0 || cluster < 1; }

// Calls f(T{}) with T the element type of dtype code 0 float32, 1 float16, 2 bfloat16 (launchers.h's DType);
// 2 (bad arguments) for any other code.
template <typename F>
int with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      return f(float{});
    case 1:
      return f(__half{});
    case 2:
      return f(__nv_bfloat16{});
  }
  return 2;
}

}  // namespace

// Each entry returns 0, 1 when the PPO cache check failed, 2 on bad arguments.
extern "C" int rk_emulate_logprobs(int dtype, const void* logits, const int64_t* targets, int64_t rows,
                                   int64_t row_stride, int64_t vocab, float inv_t, int64_t ignore_index,
                                   int threads, int cluster, float* logp, float* entropy, float* lse) {
  if (bad_launch(threads, cluster) || vocab < 1) return 2;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return logprobs_rows(static_cast<const T*>(logits), targets, rows, row_stride, vocab, inv_t, ignore_index,
                         threads, cluster, logp, entropy, lse);
  });
}

extern "C" int rk_emulate_kl(int dtype, const void* logits, const void* ref_logits, int64_t rows, int64_t row_stride,
                             int64_t ref_row_stride, int64_t vocab, float inv_t, int threads, float* kl,
                             float* lse_z, float* lse_r) {
  if (bad_launch(threads, 1) || vocab < 1) return 2;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return kl_rows(static_cast<const T*>(logits), static_cast<const T*>(ref_logits), rows, row_stride,
                   ref_row_stride, vocab, inv_t, threads, kl, lse_z, lse_r);
  });
}

extern "C" int rk_emulate_kl_bwd(int dtype, void* grad_z, void* grad_r, const void* logits, const void* ref_logits,
                                 const float* g, const float* kl, const float* lse_z, const float* lse_r, int64_t rows,
                                 int64_t row_stride, int64_t ref_row_stride, int64_t grad_row_stride, int64_t vocab,
                                 float inv_t, int64_t cols_per_cta, int threads) {
  if (bad_launch(threads, 1) || vocab < 1 || cols_per_cta < 1) return 2;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    kl_bwd_rows(static_cast<T*>(grad_z), static_cast<T*>(grad_r), static_cast<const T*>(logits),
                static_cast<const T*>(ref_logits), g, kl, lse_z, lse_r, rows, row_stride, ref_row_stride,
                grad_row_stride, vocab, inv_t, cols_per_cta, threads);
    return 0;
  });
}

extern "C" int rk_emulate_logprobs_bwd(int dtype, void* grad, const void* logits, const int64_t* targets,
                                       const float* g_logp, const float* g_ent, const float* lse,
                                       const float* entropy, int64_t rows, int64_t row_stride,
                                       int64_t grad_row_stride, int64_t vocab, float inv_t, int64_t ignore_index,
                                       int64_t cols_per_cta, int threads) {
  if (bad_launch(threads, 1) || vocab < 1 || cols_per_cta < 1) return 2;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    logprobs_bwd_rows(static_cast<T*>(grad), static_cast<const T*>(logits), targets, g_logp, g_ent, lse, entropy,
                      rows, row_stride, grad_row_stride, vocab, inv_t, ignore_index, cols_per_cta, threads);
    return 0;
  });
}

extern "C" int rk_emulate_fused_grad(int dtype, void* grad, const void* logits, const int64_t* targets,
                                     const float* g_logp, const float* g_ent, int64_t rows, int64_t row_stride,
                                     int64_t grad_row_stride, int64_t vocab, float inv_t, int64_t ignore_index,
                                     int threads, int cluster, int cache_mode, float* logp, float* entropy, float* lse) {
  if (bad_launch(threads, cluster) || vocab < 1) return 2;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return fused_grad_rows(static_cast<T*>(grad), static_cast<const T*>(logits), targets, g_logp, g_ent, rows,
                           row_stride, grad_row_stride, vocab, inv_t, ignore_index, threads, cluster, cache_mode,
                           logp, entropy, lse);
  });
}

extern "C" int rk_emulate_fused_grad_pipe(int dtype, void* grad, const void* logits, const int64_t* targets,
                                          const float* g_logp, const float* g_ent, int64_t rows, int64_t row_stride,
                                          int64_t grad_row_stride, int64_t vocab, float inv_t, int64_t ignore_index,
                                          int threads, int cluster, int n_clusters, float* logp, float* entropy,
                                          float* lse) {
  if (bad_launch(threads, cluster) || vocab < 1 || n_clusters < 1) return 2;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return pipe_grad_rows(static_cast<T*>(grad), static_cast<const T*>(logits), targets, g_logp, g_ent, rows,
                          row_stride, grad_row_stride, vocab, inv_t, ignore_index, threads, cluster, n_clusters,
                          logp, entropy, lse);
  });
}

// ppo_aggregate.cu's two one-CTA kernels of `threads` threads: loss_weights_kernel (the weights of loss_agg `agg`
// and total = Σ mask) then, over the fused kernel's per-token outputs, loss_sums_kernel (loss and means), with the
// kernels' strided partial sums, warp butterflies and block_reduce trees.
extern "C" int rk_emulate_loss_aggregate(const float* mask, int64_t rows, int64_t cols, int agg, int threads,
                                         const float* term, const float* clipped, const float* logp,
                                         const float* old_logp, float* weights, float* loss, float* means) {
  if (bad_launch(threads, 1) || agg < 0 || agg > 3 || rows < 0 || cols < 0) return 2;
  const auto mode = static_cast<rlhf_kernels::cuda::LossAgg>(agg);
  const int64_t n = rows * cols;
  const int warps = threads / 32;
  const auto plus = [](float a, float b) { return a + b; };
  std::vector<float> parts(threads);
  for (int t = 0; t < threads; ++t) parts[t] = strided_sum(mask, n, t, threads);
  const float total = block_reduce_emulated(parts, 0.f, plus);
  // a warp's Σ_t m of row r: lane 0's butterfly result, which warp_sum hands to every lane
  const auto row_sum = [&](int64_t r) {
    float lanes[32];
    for (int l = 0; l < 32; ++l) lanes[l] = lane_row_sum(mask, r, cols, l);
    return warp_reduce(lanes, plus);
  };
  if (mode == rlhf_kernels::cuda::LossAgg::kSeqMeanTokenMean) {
    std::vector<float> positive(threads, 0.f);  // lane 0 of each warp holds its rows' count
    for (int w = 0; w < warps; ++w) {
      for (int64_t r = w; r < rows; r += warps) {
        const float s = row_sum(r);
        positive[32 * w] += s > 0.f ? 1.f : 0.f;
        for (int64_t c = 0; c < cols; ++c) weights[r * cols + c] = divide_or_zero(mask[r * cols + c], s);
      }
    }
    const float non_empty = block_reduce_emulated(positive, 0.f, plus);
    for (int64_t i = 0; i < n; ++i) weights[i] = divide_or_zero(weights[i], non_empty);
  } else {
    for (int64_t i = 0; i < n; ++i) weights[i] = token_weight(mode, mask[i], total, rows, cols);
  }
  std::vector<LossSums> sums(threads);
  for (int t = 0; t < threads; ++t) {
    sums[t] = strided_loss_sums(weights, mask, term, clipped, logp, old_logp, n, t, threads);
  }
  const LossSums s = block_reduce_emulated(sums, LossSums{0.f, 0.f, 0.f}, loss_sums_merge);
  *loss = s.loss;
  means[0] = divide_or_zero(s.clipped, total);
  means[1] = divide_or_zero(s.half_sq, total);
  return 0;
}

// token_terms.cuh's per-token arithmetic (what ppo_term.cuh's finish_ppo_row takes from it), token by token over n
// tokens: pg, ∂pg/∂logp and clipped (1 / 0) of the clipped surrogate, and with estimator 1-3 (ref not null) the
// KL estimate k and ∂k/∂logp; estimator 0 leaves kl and dk alone.
extern "C" int rk_emulate_ppo_token(const float* logp, const float* old, const float* adv, const float* ref, int64_t n,
                                    float clip_low, float clip_high, int has_dual, float dual_clip, int estimator,
                                    float* pg, float* dpg, float* clipped, float* kl, float* dk) {
  if (n < 0 || estimator < 0 || estimator > 3 || (estimator > 0 && ref == nullptr)) return 2;
  rlhf_kernels::cuda::PpoParams p{};
  p.clip_low = clip_low;
  p.clip_high = clip_high;
  p.has_dual = has_dual != 0;
  p.dual_clip = dual_clip;
  for (int64_t i = 0; i < n; ++i) {
    const PolicyGrad g = ppo_pg(logp[i], old[i], adv[i], p);
    pg[i] = g.pg;
    dpg[i] = g.dpg;
    clipped[i] = g.clipped ? 1.f : 0.f;
    if (estimator > 0) {
      kl[i] = kl_k(logp[i], ref[i], estimator);
      dk[i] = kl_k_dlogp(logp[i], ref[i], estimator);
    }
  }
  return 0;
}

// ppo.cu's per-row forward (ppo_rows) over `rows` rows: outputs[6 · rows] = term, logp, entropy, kl, clipped, lse
// (each [rows]); ref_logp may be null (no KL term), weights too (no gradient: tok is not written).
extern "C" int rk_emulate_ppo_rows(int dtype, const void* logits, const int64_t* targets, int64_t rows,
                                   int64_t row_stride, int64_t vocab, float inv_t, int64_t ignore_index, int threads,
                                   int cluster, const float* old_logp, const float* advantages, const float* ref_logp,
                                   const float* weights, float kl_coef, int estimator, float entropy_coef,
                                   float clip_low, float clip_high, int has_dual, float dual_clip, float* outputs,
                                   float* tok) {
  if (bad_launch(threads, cluster) || vocab < 1 || rows < 0 || estimator < 1 || estimator > 3) return 2;
  rlhf_kernels::cuda::PpoParams p{};
  p.inv_t = inv_t;
  p.ignore_index = ignore_index;
  p.kl_coef = kl_coef;
  p.entropy_coef = entropy_coef;
  p.clip_low = clip_low;
  p.clip_high = clip_high;
  p.dual_clip = dual_clip;
  p.has_ref = ref_logp != nullptr;
  p.has_dual = has_dual != 0;
  p.kl_estimator = estimator;
  float* out = outputs;
  const PpoOutputs io{old_logp, advantages, ref_logp, weights, out, out + rows, out + 2 * rows, out + 3 * rows,
                      out + 4 * rows, out + 5 * rows};
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return ppo_rows(static_cast<const T*>(logits), targets, rows, row_stride, vocab, threads, cluster, p, io, tok);
  });
}
