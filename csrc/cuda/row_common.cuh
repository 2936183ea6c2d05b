// Device helpers shared by the row kernels (logprobs.cu, kl.cu, ppo.cu): block reductions, the
// gradient writer and the log-prob gradient. CUDA headers only.
//
// Rows are walked in 16-byte vectors aligned to the row's *address*, not to column 0 (see RowVecs
// in row_stats.cuh, which also holds the forward sweep's statistics), so any row start (odd V,
// strided views like logits[:, :-1]) is vectorised and nothing outside [0, V) is ever read or written.
#pragma once

#include "row_grad.cuh"
#include "row_stats.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace detail {

constexpr int kMaxThreads = 1024;

// write_row_range's Stash on the GPU: one shared-memory float per CTA, the target's logit / T, read back after the
// loop by the thread that rewrites the target's column. kPreload: that thread reads it itself before the loop (the
// logprobs backward); else the kernel's thread 0, which holds the target's logit from sweep 1, puts it before the
// __syncthreads ahead of sweep 2 (the PPO kernels, whose 64-register budget a read in front of the loop overran).
// Volatile, so it comes back from shared memory rather than in a register kept live through the loop.
template <bool kPreloadIt>
struct SharedStash {
  static constexpr bool kPreload = kPreloadIt;
  __device__ __forceinline__ static volatile float& slot() {
    __shared__ float z;
    return z;
  }
  __device__ __forceinline__ static void put(float z) { slot() = z; }
  __device__ __forceinline__ static float get() { return slot(); }
};

__device__ __forceinline__ RowStats shfl_xor(const RowStats& st, int lane_mask) {
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

__device__ __forceinline__ RowStats block_stats_reduce(RowStats st, float c) {
  return block_reduce(st, stats_init(), [c](const RowStats& a, const RowStats& b) { return stats_merge(a, b, c); },
                      [](const RowStats& a, int off) { return shfl_xor(a, off); });
}

// Row start of row `row` of a [B, T, V] view with strides (stride_b, stride_t, 1); P may be const
// (logits) or not (gradients written at their own row strides).
template <typename P>
__device__ __forceinline__ P* row_ptr(P* base, int64_t row, int64_t rows_inner, int64_t stride_b,
                                      int64_t stride_t) {
  const int64_t b = row / rows_inner;
  return base + b * stride_b + (row - b * rows_inner) * stride_t;
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels

// ---------------------------------------------------------------- host helpers

#include <cstdlib>
#include <cstring>

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
inline int sweep_threads(int64_t vectors, int max_threads) {
  int t = 32;
  while (t < max_threads && static_cast<int64_t>(t) * 8 < vectors) t *= 2;
  return t;
}

// Default CTA size caps of the forward kernels, the fastest of benchmarks/tune_cuda.py's sweep on an
// H200 (bf16, N = 8192, V = 151936; benchmarks/results/nvidia-h200/NOTES.md): smaller CTAs put more rows
// in flight per SM. logprobs(+entropy) 97.7% of the copy bandwidth at 128 threads against 90.8% at 512;
// KL 86.7% at 256 (85.3% at 128); PPO forward 89.2% at 128; PPO forward-with-gradient fastest at 256.
constexpr int kLogprobsForwardCap = 128;
constexpr int kKlForwardCap = 256;
constexpr int kPpoForwardCap = 128;
constexpr int kPpoFusedCap = 256;
constexpr int kPpoL2Cap = 512;  // kL2: one or two CTAs per SM, so each needs more loads in flight
constexpr int kPpoPipeCap = 512;  // kPipe: one persistent CTA per SM (also its kernel's __launch_bounds__)

// The forward kernels' CTA size cap: RLHF_KERNELS_CUDA_FWD_THREADS when set (a power of two in 32..512),
// else `default_cap`. A tuning knob, read at every launch so that benchmarks/tune_cuda.py can sweep it
// in one process; the Python ops reject any other value before launching (ops/_dispatch.py).
inline int forward_thread_cap(int default_cap) {
  const char* text = std::getenv("RLHF_KERNELS_CUDA_FWD_THREADS");
  const int n = text != nullptr ? std::atoi(text) : 0;
  return n >= 32 && n <= 512 && (n & (n - 1)) == 0 ? n : default_cap;
}

// How the fused PPO forward's shared-memory paths fill their slice: RLHF_KERNELS_CUDA_PREFETCH=0 the register sweep
// (sweep_row_stats' sink), 1 or unset cp.async (row_prefetch.cuh; on by default since the H200's run 3: faster than
// the register sweep at every CTA cap, tune_cuda.py), bulk the TMA's bulk copies (row_bulk.cuh; sm_90, opt-in until
// a GPU run times it; kernels compiled for older GPUs take cp.async instead). Read at every launch; ops/ppo.py
// rejects other values by name.
enum PrefetchMode : int { kPrefetchOff = 0, kPrefetchCopies = 1, kPrefetchBulk = 2 };

inline int prefetch_mode() {
  const char* text = std::getenv("RLHF_KERNELS_CUDA_PREFETCH");
  if (text == nullptr) return kPrefetchCopies;
  if (std::strcmp(text, "0") == 0) return kPrefetchOff;
  return std::strcmp(text, "bulk") == 0 ? kPrefetchBulk : kPrefetchCopies;
}

// The smallest thread-block cluster the fused PPO forward's cluster path may split a row over:
// RLHF_KERNELS_CUDA_CLUSTER=2|4|8 (read at every launch; ops/ppo.py rejects other values by name), else 2,
// i.e. the smallest cluster whose slices fit. A larger cluster gives each CTA a smaller slice, so more CTAs
// fit on an SM: on an H200 a bf16 row of 151936 over 4 CTAs holds 76 KB each, 3 CTAs (37.5% occupancy) per SM,
// and ran at 54% of DRAM throughput (benchmarks/results/nvidia-h200/logs/run3/ncu_summary.md); over 8, 38 KB
// each and 4 CTAs per SM (registers then limit). benchmarks/tune_cuda.py times both.
inline int min_cluster_size() {
  const char* text = std::getenv("RLHF_KERNELS_CUDA_CLUSTER");
  const int n = text != nullptr ? std::atoi(text) : 0;
  return n == 2 || n == 4 || n == 8 ? n : 2;
}

// Threads of a forward CTA that sweeps `vectors` vectors (a row, or a cluster's slice of one).
inline int forward_threads(int64_t vectors, int default_cap) {
  return sweep_threads(vectors, forward_thread_cap(default_cap));
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
