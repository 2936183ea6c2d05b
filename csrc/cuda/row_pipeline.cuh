// Staging a row slice in shared memory one row ahead, for the fused PPO forward's persistent cluster path
// (ppo.cu, kPipe; RLHF_KERNELS_CUDA_PPO=pipe).
//
// Why: the cluster path (kCluster) gives each CTA one row slice: it loads the slice, waits at the cluster
// barrier, writes the slice's gradient, exits. Three such CTAs per SM overlapped their reads and writes little:
// 54% of DRAM throughput on an H200 (run 3's ncu; 64% of the one-read-one-write floor in run 4). The persistent
// kernel keeps one CTA per SM with two slice buffers: while it sweeps row r from one buffer and writes its
// gradient, row r + step is on its way into the other by cp.async, so the SM always has a full slice of loads
// in flight and its stores overlap them.
//
// A thread stages exactly the vectors sweep_row_stats would give it (body vectors first + j·step; thread 0 the
// partial head, thread step - 1 the partial tail), and sweep_slice_stats folds them in sweep_row_stats' order
// (partial vectors first, then groups of kUnroll, then the remainder one by one): the statistics are bit for bit
// those of the register sweep at the same thread count, and each thread reads back only what it staged itself
// (visible to it once its cp.async.wait_group returns). The partial vectors are element loads: they are loaded
// into registers when the row is staged and stored into the buffer one row later (store_partial_vecs), so the
// loads' latency hides behind a whole row of work instead of stalling the warp. On the host (the CPU emulation,
// tests/cuda/row_stats_emulation.cpp) the copies are plain stores.
#pragma once

#include "row_prefetch.cuh"
#include "row_stats.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace detail {

// The partial head / tail vectors of a staged slice, held in registers until store_partial_vecs; slot -1: none.
struct StagedPartials {
  uint4 head, tail;
  int64_t head_slot, tail_slot;
};

// The partial head (thread 0) and tail (thread step - 1) vectors of [k_lo, k_hi), element loads into registers,
// with the slots store_partial_vecs puts them in.
template <typename T>
RK_HD StagedPartials load_partial_vecs(const T* row, const RowVecs& rv, int64_t V, int64_t k_lo, int64_t k_hi,
                                       const VecRange& body, int64_t first, int64_t step) {
  StagedPartials out{uint4{0u, 0u, 0u, 0u}, uint4{0u, 0u, 0u, 0u}, -1, -1};
  if (first == 0 && k_lo < body.body_lo) {
    out.head = load_vec_masked(row, k_lo, rv.pre, V);
    out.head_slot = 0;
  }
  if (first == step - 1 && body.body_hi < k_hi) {
    out.tail = load_vec_masked(row, k_hi - 1, rv.pre, V);
    out.tail_slot = k_hi - 1 - k_lo;
  }
  return out;
}

// Issues this thread's copies of vectors [k_lo, k_hi) of the row into slice[k - k_lo] (one cp.async group,
// always committed, empty or not, so every thread's group count stays in step) and loads its partial vectors.
template <typename T>
RK_HD StagedPartials stage_slice(uint4* slice, const T* row, const RowVecs& rv, int64_t V, int64_t k_lo,
                                 int64_t k_hi, int64_t first, int64_t step) {
  const VecRange body = split_vecs(rv, k_lo, k_hi);
  const uint4* vecs = reinterpret_cast<const uint4*>(row - rv.pre);
  for (int64_t k = body.body_lo + first; k < body.body_hi; k += step) copy_vec_async(slice + (k - k_lo), vecs + k);
  commit_copies();
  return load_partial_vecs(row, rv, V, k_lo, k_hi, body, first, step);
}

// Stores the partial vectors stage_slice loaded into the slice they belong to.
RK_HD void store_partial_vecs(uint4* slice, const StagedPartials& s) {
  if (s.head_slot >= 0) slice[s.head_slot] = s.head;
  if (s.tail_slot >= 0) slice[s.tail_slot] = s.tail;
}

// No wait before a fold: every vector of the slice is visible to the thread already (kPipe).
struct SliceReady {
  RK_HD void operator()(int64_t) const {}
};

// This thread's statistics of the staged vectors [k_lo, k_hi) (slice[k - k_lo]), folded in sweep_row_stats'
// order, so the result is the register sweep's to the bit. ready(k) runs before the body vectors up to k are read
// (row_bulk.cuh waits there for the chunk of the slice that holds k); k only grows from one call to the next.
template <typename T, int kUnroll, typename Ready = SliceReady>
RK_HD RowStats sweep_slice_stats(const uint4* slice, const RowVecs& rv, int64_t V, int64_t k_lo, int64_t k_hi,
                                 int64_t first, int64_t step, float c, Ready ready = Ready{}) {
  constexpr int kVec = Vec<T>::kSize;
  const VecRange body = split_vecs(rv, k_lo, k_hi);
  RowStats st = stats_init();
  const auto partial = [&](int64_t k) {
    float x[1][kVec];
    masked_to_floats<T>(slice[k - k_lo], k, rv.pre, V, x[0]);
    stats_update(st, x, c);
  };
  if (first == 0 && k_lo < body.body_lo) partial(k_lo);
  if (first == step - 1 && body.body_hi < k_hi) partial(k_hi - 1);
  int64_t k = body.body_lo + first;
  for (; k + (kUnroll - 1) * step < body.body_hi; k += kUnroll * step) {
    ready(k + (kUnroll - 1) * step);
    float x[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) vec_to_floats(slice[k + u * step - k_lo], x[u], T{});
    stats_update(st, x, c);
  }
  for (; k < body.body_hi; k += step) {
    ready(k);
    float x[1][kVec];
    vec_to_floats(slice[k - k_lo], x[0], T{});
    stats_update(st, x, c);
  }
  return st;
}

// Where column y of the row lives among a cluster's slices of `per_cta` vectors: the rank whose slice holds
// it, or -1 when y is ignore_index or outside [0, V) (the kernels then take the target's logit as 0, as
// target_value does).
RK_HD int target_owner(int64_t y, int64_t V, int64_t ignore_index, int64_t pre, int kVec, int64_t per_cta) {
  if (y == ignore_index || y < 0 || y >= V) return -1;
  return static_cast<int>(((y + pre) / kVec) / per_cta);
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
