// Sweep 1 of the fused PPO forward's on-chip paths (ppo.cu's kShared and kCluster) with the CTA's row slice
// copied into shared memory by the Tensor Memory Accelerator: RLHF_KERNELS_CUDA_PREFETCH=bulk, sm_90.
//
// Why: the cp.async sweep (row_prefetch.cuh) has every thread issue its own 16-byte copies, 31 instructions per
// group of 4, with kPrefetchDepth groups (64 KB per 256-thread CTA) in flight. The H200's run 3 put the cluster
// path at 0.61 issued instructions per cycle per scheduler with DRAM at 54% of its throughput: neither the memory
// nor the SM at its limit, which suggests too few loads in flight while issue slots go to issuing them (a GPU
// run is to say: the next one times this against the cp.async sweep).
// Here thread 0 issues the whole slice as at most kBulkMaxChunks bulk copies (cp.async.bulk, one instruction
// each, no register per byte), so all of the slice (76 KB per CTA at bf16 V = 151936 over 4 CTAs) is in flight
// from the kernel's first microseconds, and the other threads' issue slots go to folding. Each chunk lands behind
// its own mbarrier (expect_tx of its bytes), so a thread folds a chunk as soon as it has landed instead of
// waiting for the whole slice.
//
// Same arithmetic and order as sweep_row_stats: the partial head / tail vectors are element loads by threads 0 and
// step - 1 (stored into the slice, as kPipe does), then sweep_slice_stats folds each thread's vectors in the
// register sweep's grouping, so the statistics are bit for bit those of RLHF_KERNELS_CUDA_PREFETCH=0 and 1.
// Chunks are whole rounds of kUnroll·step vectors (every thread's group g lies in one chunk), so a thread waits
// at most once per group. Every thread waits for every chunk before it returns: each has then seen the whole
// slice land (sweep 2 reads any of it after the block reduction's __syncthreads) and no copy is in flight when
// the CTA exits.
//
// On the host (the CPU emulation, tests/cuda/row_stats_emulation.cpp) nothing is issued: a chunk is copied when a
// thread waits for it, so a fold that read a chunk it had not waited for would read what the harness put there
// (NaN bytes) and show up in the statistics.
#pragma once

#include "row_pipeline.cuh"
#include "row_stats.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace detail {

// The bulk kernels' CTA size cap, with 3 CTAs per SM in their launch bounds (85 registers each, where the 512-thread
// bound of the others leaves 64, which the bulk sweep's bookkeeping spilled): the cluster path's slices fit 3 per SM
// at bf16 V = 151936 over 4 CTAs, and 256 threads is the cap tune_cuda.py found fastest there.
constexpr int kBulkMaxThreads = 256;

// At most this many bulk copies (and mbarriers, 8 bytes of static shared memory each) per CTA and row.
constexpr int kBulkMaxChunks = 8;

// The slice body [body_lo, body_hi) (whole, 16-byte aligned vectors) in `count` chunks of `per` vectors, the last
// one shorter: chunk i = [body_lo + i·per, min(body_lo + (i + 1)·per, body_hi)).
struct BulkChunks {
  int64_t body_lo, body_hi, per;
  int count;
};

// `round` = kUnroll·step, the vectors one group of every thread covers; per is a whole number of rounds.
RK_HD BulkChunks bulk_chunks(const VecRange& body, int64_t round) {
  const int64_t n = body.body_hi - body.body_lo;
  const int64_t rounds = (n + round - 1) / round;
  const int64_t per = round * ((rounds + kBulkMaxChunks - 1) / kBulkMaxChunks);
  return {body.body_lo, body.body_hi, per > 0 ? per : round, n > 0 ? static_cast<int>((n + per - 1) / per) : 0};
}

// One past chunk `lo`'s last vector (lo = body_lo + i·per).
RK_HD int64_t chunk_end(const BulkChunks& ch, int64_t lo) {
  return lo + ch.per < ch.body_hi ? lo + ch.per : ch.body_hi;
}

RK_HD void cta_sync() {
#ifdef __CUDA_ARCH__
  __syncthreads();
#endif
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif

// Thread 0: one mbarrier per chunk, armed with the chunk's bytes, and the chunk's bulk copy into cache[k - k_lo].
RK_HD void issue_bulk_copies(uint4* cache, const uint4* vecs, const BulkChunks& ch, int64_t k_lo, uint64_t* bars) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  for (int i = 0; i < ch.count; ++i) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(shared_address(bars + i)) : "memory");
  }
  // the initialised barriers visible to the copy engine (async proxy) and, after the caller's __syncthreads,
  // to the other threads
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  for (int i = 0; i < ch.count; ++i) {
    const int64_t lo = ch.body_lo + i * ch.per;
    const unsigned bytes = static_cast<unsigned>((chunk_end(ch, lo) - lo) * 16);
    const unsigned bar = shared_address(bars + i);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
            shared_address(cache + (lo - k_lo))),
        "l"(vecs + lo), "r"(bytes), "r"(bar)
        : "memory");
  }
#else
  (void)cache, (void)vecs, (void)ch, (void)k_lo, (void)bars;
#endif
}

#ifdef __CUDACC__
// Spins of wait_bulk_chunk before it gives up: each failed try_wait suspends the thread for a while first, so this
// is seconds, where a chunk lands in microseconds. A copy that never completes its barrier (a bug) then ends the
// kernel with an error instead of hanging the process, and the GPU session's time with it.
constexpr unsigned kBulkWaitSpins = 1u << 24;

// Blocks until chunk i has landed in the slice (the barriers' first phase, parity 0: one row per CTA).
__device__ __forceinline__ void wait_bulk_chunk(uint64_t* bars, int i) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned bar = shared_address(bars + i);
  unsigned done = 0;
  for (unsigned spins = 0; !done; ++spins) {
    if (spins == kBulkWaitSpins) __trap();
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar)
        : "memory");
  }
#else
  (void)bars, (void)i;
  __trap();  // ppo.cu takes this sweep only where it was compiled for sm_90+
#endif
}
#endif  // __CUDACC__

// This thread's statistics of vectors [k_lo, k_hi) of the row, the slice copied to cache[k - k_lo] by the TMA.
// Every thread of the CTA calls it (it holds a __syncthreads); `bars`: kBulkMaxChunks mbarriers in shared memory.
template <typename T, int kUnroll>
RK_HD RowStats sweep_row_stats_bulk(const T* row, const RowVecs& rv, int64_t V, int64_t k_lo, int64_t k_hi,
                                    int64_t first, int64_t step, float c, uint4* cache, uint64_t* bars) {
  const VecRange body = split_vecs(rv, k_lo, k_hi);
  const BulkChunks ch = bulk_chunks(body, kUnroll * step);
  const uint4* vecs = reinterpret_cast<const uint4*>(row - rv.pre);
  if (first == 0) issue_bulk_copies(cache, vecs, ch, k_lo, bars);
  // the partial vectors' element loads go out while the bulk copies are in flight; stored before the barrier, so
  // the fold below reads them back like any other vector of the slice
  store_partial_vecs(cache, load_partial_vecs(row, rv, V, k_lo, k_hi, body, first, step));
  cta_sync();  // the mbarriers are initialised before any thread waits on them
  // chunks [0, landed) are known to have landed: every body vector below landed_end
  int landed = 0;
  int64_t landed_end = ch.body_lo;
  const auto land_next = [&] {
#ifdef __CUDA_ARCH__
    wait_bulk_chunk(bars, landed);
#else  // the host's copy engine: the chunk arrives when a thread first waits for it
    std::memcpy(cache + (landed_end - k_lo), vecs + landed_end,
                static_cast<size_t>(chunk_end(ch, landed_end) - landed_end) * 16);
#endif
    ++landed;
    landed_end += ch.per;
  };
  const auto ready = [&](int64_t k) {
    while (k >= landed_end) land_next();
  };
  const RowStats st = sweep_slice_stats<T, kUnroll>(cache, rv, V, k_lo, k_hi, first, step, c, ready);
  while (landed < ch.count) land_next();
  return st;
}

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
