// The fused PPO per-token term on the GPU, straight from logits, optionally writing dlogits
// in the same kernel (DESIGN.md §2; mirrors rlhf_kernels/triton/ppo.py).
//
// Per row, with logp / entropy H / lse from one sweep of the row (as logprobs.cu):
//   r    = exp(clamp(logp - old, -20, 20))
//   pg   = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high));  pg = min(pg, -A·dual) where A < 0
//   term = pg + kl_coef·k(logp, ref) - entropy_coef·H
// and the per-token derivative (PyTorch autograd's sub-gradient choices, as the Triton backward):
//   ∂term/∂logp = -A·r·[unclipped branch]·[|logp - old| <= 20]·(½ at a dual-clip tie) + kl_coef·∂k/∂logp
//   ∂term/∂H    = -entropy_coef
//
// Forward that also produces the gradient: ppo_loss aggregates term linearly, loss = Σ w·term
// with w known from the mask and loss_agg alone, so with `weights` = w the kernel writes
//   dlogits = w·∂term/∂logits   (G_logp = w·∂term/∂logp, G_H = -w·entropy_coef, the log-prob
//                                backward formula of logprobs.cu)
// right after the statistics are known, and the autograd backward only scales by the scalar
// upstream gradient. A second sweep over the row is needed (p needs lse); where the row is
// kept decides how many times the logits come from memory:
//   kShared   the CTA's dynamic shared memory holds the whole row (bf16 V <~ 56K on H100)
//   kCluster  sm_90: a cluster of 2-8 CTAs on different SMs splits the row, each slice kept
//             in its CTA's shared memory; the per-slice (m, s, t) are exchanged through
//             distributed shared memory. Logits are read once, dlogits written once.
//   kGlobal   the second sweep re-reads the row (any GPU, any V): two reads, one write.
//   kL2       kGlobal with the CTAs per SM capped (by an unused dynamic shared-memory request): as many
//             as have their rows fit in half of L2, at least one (one for bf16 V = 151936, whose 132 rows
//             in flight take 39 of an H100/H200's 50 MB), and the second sweep run backwards: it starts
//             with the lines the first sweep read last. Where the re-read hits L2, DRAM sees one read and
//             one write, as on the on-chip paths, without a cluster.
//   kPipe     sm_90: kCluster's slices, kept by a persistent kernel with one CTA per SM and two slice buffers
//             (row_pipeline.cuh): the next row's slice is on its way in while this row's gradient goes out.
//             One read and one write, reads and writes overlapped on every SM. Opt-in (RLHF_KERNELS_CUDA_PPO=pipe)
//             until a GPU run times it against kCluster.
// Without a gradient (kForwardOnly) ppo_fwd_only_kernel sweeps each row once, as logprobs_fwd_kernel does.
// With RLHF_KERNELS_CUDA_PREFETCH=1 (the default) the on-chip paths fill their shared-memory slice with cp.async,
// kPrefetchDepth groups of 4 vectors in flight per thread (row_prefetch.cuh); with =bulk (sm_90, opt-in) thread 0
// has the TMA copy the whole slice in at most kBulkMaxChunks bulk copies (row_bulk.cuh); same results, bit for bit.
// Without an entropy bonus (entropy_coef = 0, G_H = 0 in every row) the launch takes ppo_fwd_kernel<..., kNoEntropy>
// (and ppo_fwd_pipe_kernel<T, kNoEntropy>),
// whose sweep 2 uses LogprobGradNoEntropy: the same values, 3 instructions fewer per value (bf16 on sm_90, with
// write_row_range's other savings: 8.6 instructions per value against 11.6 with the entropy term; benchmarks/sass_report.py).
// ppo_fwd_kernel<T, kCluster, kProbe = true> is the probe (ppo_probe.cuh, benchmarks/probe_ppo.py): the same
// kernel with per-CTA phase stamps and stages that can be left out; the production instantiations compile to the
// same SASS as without it (checked with cuobjdump when it was added).
#include <cooperative_groups.h>

#include <type_traits>

#include "ppo_probe.cuh"
#include "ppo_term.cuh"
#include "row_bulk.cuh"
#include "row_common.cuh"
#include "row_pipeline.cuh"
#include "row_prefetch.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace {

using namespace detail;
namespace cg = cooperative_groups;

// The largest thread-block cluster a launch may ask for (16 with the non-portable attribute; the planner's paths
// use at most 8); the cluster exchange has lane r of warp 0 fetch peer r, so it must stay within a warp.
constexpr int kMaxClusterCtas = 16;

// kProbe: the probe instantiation (ppo_probe.cuh): stamps and skipped stages, for benchmarks/probe_ppo.py only.
// kNoEntropy: the launch's entropy coefficient is 0, so sweep 2 takes LogprobGradNoEntropy (row_grad.cuh; the same
// values, three instructions fewer per column).
template <typename T, bool kCluster, bool kProbe = false, bool kNoEntropy = false, bool kBulk = false>
__global__ void __launch_bounds__(kBulk ? kBulkMaxThreads : 512, kBulk ? 3 : 2)
    ppo_fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets, PpoOutputs io,
                   T* __restrict__ grad, int64_t rows_inner, int64_t stride_b, int64_t stride_t,
                   int64_t grad_stride_b, int64_t grad_stride_t, int64_t vocab, PpoParams p, int64_t vecs_per_cta,
                   bool in_smem, bool prefetch, bool reverse_sweep2,
                   std::conditional_t<kProbe, PpoProbe, NoProbe> probe) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (kCluster || kBulk) {
    __trap();  // the host launches the cluster and bulk variants only where they were compiled for sm_90+
  } else
#endif
  {
    constexpr int kVec = Vec<T>::kSize;
    extern __shared__ uint4 cache[];   // this CTA's slice of the row (kShared / kCluster)
    // (constant in the bulk kernel, which runs the on-chip paths only: fewer live registers under the 64 cap)
    const bool on_chip = kBulk || in_smem;
    const bool reverse = !kBulk && reverse_sweep2;
    __shared__ RowStats partial;       // this CTA's statistics, read by the cluster's peers
    __shared__ float tok[4];           // lse, entropy, G_logp, G_H of the row
    int rank = 0, csize = 1;
    int64_t row = blockIdx.x;
    (void)csize;
    (void)partial;
    (void)probe;
    if constexpr (kProbe) {
      probe_mark(probe, kProbeStartNs);
      probe_mark(probe, kProbeStart);
      probe_mark(probe, kProbeSm);
    }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    if constexpr (kCluster) {
      rank = static_cast<int>(cg::this_cluster().block_rank());
      csize = static_cast<int>(cg::this_cluster().num_blocks());
      row = blockIdx.x / csize;
      if constexpr (kProbe) {
        // the push exchange writes into the peers' shared memory, which exists once every CTA has started
        // (waited for before the first push)
        if (probe_skips(probe, kProbePushExchange)) __cluster_barrier_arrive_relaxed();
      }
    }
#endif
    const T* x = row_ptr(logits, row, rows_inner, stride_b, stride_t);
    const RowVecs rv = row_vecs(x, vocab);
    const int64_t k_lo = min(static_cast<int64_t>(rank) * vecs_per_cta, rv.count);
    const int64_t k_hi = min(k_lo + vecs_per_cta, rv.count);

    // The row's scalars, loaded ahead of sweep 1 so their latency hides behind it instead of stalling the CTA
    // between the sweeps (thread 0 uses them; with 3 CTAs per SM on the cluster path there is little else to run).
    const int64_t y = targets[row];
    RowScalars scalars{0.f, 0.f, 0.f, 0.f};
    if (threadIdx.x == 0) scalars = load_row_scalars(io, row, p, grad != nullptr);

    // sweep 1: statistics of this CTA's slice (the whole row unless clustered), caching it
    const float c = p.inv_t * kLog2e;
    const auto cache_vec = [&](int64_t k, const uint4& raw) {
      if (on_chip) cache[k - k_lo] = raw;
    };
    RowStats st;
    if constexpr (kBulk) {
      __shared__ uint64_t bulk_bars[kBulkMaxChunks];
      st = sweep_row_stats_bulk<T, 4>(x, rv, vocab, k_lo, k_hi, threadIdx.x, blockDim.x, c, cache, bulk_bars);
    } else {
      st = on_chip && prefetch
               ? sweep_row_stats_prefetch<T, 4, kPrefetchDepth>(x, rv, vocab, k_lo, k_hi, threadIdx.x, blockDim.x,
                                                                 c, cache)
               : sweep_row_stats<T, 4>(x, rv, vocab, k_lo, k_hi, threadIdx.x, blockDim.x, c, cache_vec);
    }
    // the target's logit, loaded before the reduction (and the cluster's exchange) that it would otherwise follow
    const float xy = threadIdx.x == 0 ? target_value(x, y, vocab, p.ignore_index) : 0.f;
    st = block_stats_reduce(st, c);  // ends with __syncthreads: the cache is visible to the whole CTA
    if constexpr (kProbe) probe_mark(probe, kProbeSweep1);
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    if constexpr (kCluster && kProbe) {
      if (probe_skips(probe, kProbePushExchange)) {
        // the probe's alternative exchange: thread 0 pushes this CTA's statistics into slot `rank` of every
        // peer (remote stores, nothing waited on), the barrier publishes them (release / acquire), and each CTA
        // merges its own slots in rank order (the same bits). No CTA touches a peer after that barrier, so none
        // waits again before exiting; the barrier phase it saves at the end is spent at the start instead (the
        // peers must have started before the pushes), where every CTA has long arrived by the time it waits.
        __shared__ RowStats pushed[kProbeMaxCluster];
        __cluster_barrier_wait();  // every peer has started (arrived at its start, above)
        if (threadIdx.x == 0) {
          for (int r = 0; r < csize; ++r) *cg::this_cluster().map_shared_rank(&pushed[rank], r) = st;
        }
        cg::this_cluster().sync();
        probe_mark(probe, kProbeSynced);
        if (threadIdx.x == 0) {
          RowStats total = stats_init();
          for (int r = 0; r < csize; ++r) total = stats_merge(total, pushed[r], c);
          st = total;
        }
      }
    }
    if constexpr (kCluster) {
      if (!probe_skips(probe, kProbeNoExchange) && !probe_skips(probe, kProbePushExchange)) {
        if (threadIdx.x == 0) partial = st;
        cg::this_cluster().sync();
        if constexpr (kProbe) probe_mark(probe, kProbeSynced);
        // Lane r of warp 0 fetches peer r's statistics, so the cluster's remote loads are in flight together
        // (thread 0 alone had waited out one distributed-shared-memory round trip per peer in turn: H200 run 6's
        // probe put the merge at 2.2 µs of a CTA's 17); the warp then merges them in rank order through shuffles,
        // as thread 0 had: the same bits everywhere. A lane's shuffle needs its load back, so each lane's remote
        // loads are complete before its arrive below.
        if (threadIdx.x < 32) {
          RowStats mine = stats_init();
          if (static_cast<int>(threadIdx.x) < csize) {
            mine = *static_cast<const RowStats*>(__cluster_map_shared_rank(&partial, threadIdx.x));
          }
          RowStats total = stats_init();
          for (int r = 0; r < csize; ++r) {
            const RowStats peer{__shfl_sync(0xffffffffu, mine.m, r), __shfl_sync(0xffffffffu, mine.s, r),
                                __shfl_sync(0xffffffffu, mine.t, r)};
            total = stats_merge(total, peer, c);
          }
          if (threadIdx.x == 0) st = total;
        }
        // Split barrier: arrive once this CTA has read its peers' `partial` (warp 0 above; release), wait at
        // the end, before exiting frees this CTA's `partial`. A full sync at the end instead held every CTA, and its
        // 76 KB slice of shared memory, until the slowest peer had written its part of dlogits. (The probe's
        // kProbeRelaxedArrive times the arrive without the release's GPU-scope fence.)
        if (probe_skips(probe, kProbeRelaxedArrive)) {
          __cluster_barrier_arrive_relaxed();
        } else {
          __cluster_barrier_arrive();
        }
      }
    }
#endif
    if constexpr (kProbe) {
      if (!kCluster || probe_skips(probe, kProbeNoExchange)) probe_mark(probe, kProbeSynced);  // (no barrier)
      probe_mark(probe, kProbeMerged);
    }
    const bool valid = y != p.ignore_index;
    if (threadIdx.x == 0) {
      if (!probe_skips(probe, kProbeNoRowTail)) {
        finish_ppo_row(xy, y, vocab, st, scalars, p, io, row, rank == 0, grad != nullptr, tok);
      } else {
        tok[0] = tok[1] = tok[2] = tok[3] = 0.f;
      }
      // sweep 2's target column (write_row_range) is rewritten from this, not from a re-read of the row, which
      // ppo_loss(overwrite_logits=True) overwrites; the __syncthreads below publishes it
      if (grad != nullptr) SharedStash<false>::put(mul_rn(xy, p.inv_t));
    }
    if (grad != nullptr && !probe_skips(probe, kProbeNoSweep2)) {
      __syncthreads();
      if constexpr (kProbe) probe_mark(probe, kProbeRow);
      // sweep 2: this CTA's columns of dlogits, from shared memory or from the logits again
      const int64_t c_lo = max(k_lo * kVec - rv.pre, int64_t(0));
      const int64_t c_hi = min(k_hi * kVec - rv.pre, vocab);
      T* dx = row_ptr(grad, row, rows_inner, grad_stride_b, grad_stride_t);
      if (!valid) {
        zero_row_range(dx, c_lo, c_hi, threadIdx.x, blockDim.x);
      } else {
        const LogprobGrad f = make_logprob_grad(tok[0], tok[1], tok[2], tok[3], p.inv_t);
        // cache element i holds column i + k_lo·kVec - pre: src[c] below is that element
        const T* src = on_chip ? reinterpret_cast<const T*>(cache) - (k_lo * kVec - rv.pre) : x;
        if constexpr (kProbe && kCluster) {  // (cluster only: the other kernel spilled with the copy's select)
          const bool copy = probe_skips(probe, kProbeCopySweep2);
          const auto g = [&] {
            if constexpr (kNoEntropy) return ProbeGrad<LogprobGradNoEntropy>{LogprobGradNoEntropy(f), copy};
            else return ProbeGrad<LogprobGrad>{f, copy};
          }();
          write_row_range<SharedStash<false>>(dx, src, c_lo, c_hi, copy ? 1.f : p.inv_t, y, threadIdx.x, blockDim.x, g, reverse);
        } else if constexpr (kNoEntropy) {
          write_row_range<SharedStash<false>>(dx, src, c_lo, c_hi, p.inv_t, y, threadIdx.x, blockDim.x, LogprobGradNoEntropy(f),
                          reverse);
        } else {
          write_row_range<SharedStash<false>>(dx, src, c_lo, c_hi, p.inv_t, y, threadIdx.x, blockDim.x, f, reverse);
        }
      }
    }
    if constexpr (kProbe) {
      if (grad == nullptr || probe_skips(probe, kProbeNoSweep2)) {
        __syncthreads();
        probe_mark(probe, kProbeRow);
      }
      __syncthreads();  // every thread's part of sweep 2 is written
      probe_mark(probe, kProbeSweep2);
    }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    if constexpr (kCluster) {
      // every peer has read `partial` (arrived above)
      if (!probe_skips(probe, kProbeNoExchange) && !probe_skips(probe, kProbePushExchange)) __cluster_barrier_wait();
    }
#endif
    if constexpr (kProbe) {
      probe_mark(probe, kProbeExit);
      probe_mark(probe, kProbeEndNs);
    }
  }
}

// kForwardOnly (no gradient: reference and old-policy passes, evaluation): one CTA per row, logprobs_fwd_kernel's
// sweep over the whole row and thread 0's term. Compiled apart from ppo_fwd_kernel, whose sweep 1 also carries the
// slice bounds, the shared-memory cache and the prefetch choice (17 more instructions per 32 bf16 values on sm_90,
// 305 against logprobs_fwd_kernel's 288) under a 64-register cap. The same threads, sweep and reduction as
// ppo_fwd_kernel with grad == nullptr, so the same bits.
template <typename T>
__global__ void __launch_bounds__(512)
    ppo_fwd_only_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets, PpoOutputs io,
                        int64_t rows_inner, int64_t stride_b, int64_t stride_t, int64_t vocab, PpoParams p) {
  const int64_t row = blockIdx.x;
  const T* x = row_ptr(logits, row, rows_inner, stride_b, stride_t);
  const RowVecs rv = row_vecs(x, vocab);
  const int64_t y = targets[row];
  RowScalars scalars{0.f, 0.f, 0.f, 0.f};
  if (threadIdx.x == 0) scalars = load_row_scalars(io, row, p, false);  // in flight during the sweep
  const float c = p.inv_t * kLog2e;
  RowStats st = sweep_row_stats<T, 4>(x, rv, vocab, 0, rv.count, threadIdx.x, blockDim.x, c, NoVecSink{});
  const float xy = threadIdx.x == 0 ? target_value(x, y, vocab, p.ignore_index) : 0.f;
  st = block_stats_reduce(st, c);
  if (threadIdx.x == 0) finish_ppo_row(xy, y, vocab, st, scalars, p, io, row, true, false, nullptr);
}

// What each CTA of the kPipe path leaves for its cluster's peers per row buffer.
struct SliceShare {
  RowStats st;  // this CTA's statistics of its slice
  float xy;     // the target's logit if this CTA's slice holds it (else 0, unread)
};

// kPipe: the persistent cluster kernel (sm_90; only launched with a gradient). Cluster q of Q takes rows q,
// q + Q, ...; each of its CTAs owns the same slice of every row and holds two slice buffers: row r + Q is
// staged into one (row_pipeline.cuh: cp.async, nothing waits for it) while row r is swept from the other and
// its gradient written, so the SM's loads of the next row overlap its stores of this one. Per row: sweep 1 from
// the buffer, the block reduction, one cluster barrier to exchange (statistics, target logit) through
// distributed shared memory, thread 0's term, sweep 2 from the buffer. The target's logit comes from the slice
// that holds it, so no CTA waits on a dependent global load. One CTA per SM: its two buffers take most of the
// SM's shared memory, hence 512 threads and the register budget of __launch_bounds__(512, 1). kNoEntropy: as for
// ppo_fwd_kernel, sweep 2 without the entropy term when the launch's entropy_coef is 0.
template <typename T, bool kNoEntropy>
__global__ void __launch_bounds__(kPpoPipeCap, 1)
    ppo_fwd_pipe_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets, PpoOutputs io,
                        T* __restrict__ grad, int64_t rows, int64_t rows_inner, int64_t stride_b, int64_t stride_t,
                        int64_t grad_stride_b, int64_t grad_stride_t, int64_t vocab, PpoParams p,
                        int64_t vecs_per_cta) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // the host launches it only where it was compiled for sm_90+
#else
  constexpr int kVec = Vec<T>::kSize;
  extern __shared__ uint4 cache[];   // two buffers of vecs_per_cta vectors; row i of this cluster uses i % 2
  __shared__ SliceShare share[2];    // per buffer: read by the peers after the row's cluster barrier
  __shared__ float tok[4];           // lse, entropy, G_logp, G_H of the row
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int csize = static_cast<int>(cluster.num_blocks());
  const int64_t row_step = gridDim.x / csize;
  const float c = p.inv_t * kLog2e;
  // this CTA's vectors [k_lo, k_hi) of a row
  const auto slice_lo = [&](const RowVecs& rv) { return min(static_cast<int64_t>(rank) * vecs_per_cta, rv.count); };
  const auto slice_hi = [&](const RowVecs& rv) { return min(slice_lo(rv) + vecs_per_cta, rv.count); };
  const auto stage = [&](uint4* buffer, int64_t r) {
    const T* x = row_ptr(logits, r, rows_inner, stride_b, stride_t);
    const RowVecs rv = row_vecs(x, vocab);
    return stage_slice(buffer, x, rv, vocab, slice_lo(rv), slice_hi(rv), threadIdx.x, blockDim.x);
  };

  int64_t row = blockIdx.x / csize;
  StagedPartials staged{uint4{0u, 0u, 0u, 0u}, uint4{0u, 0u, 0u, 0u}, -1, -1};
  if (row < rows) staged = stage(cache, row);
  for (int64_t i = 0; row < rows; ++i, row += row_step) {
    uint4* cur = cache + (i & 1) * vecs_per_cta;
    uint4* nxt = cache + ((i + 1) & 1) * vecs_per_cta;
    const T* x = row_ptr(logits, row, rows_inner, stride_b, stride_t);
    const RowVecs rv = row_vecs(x, vocab);
    const int64_t k_lo = slice_lo(rv), k_hi = slice_hi(rv);
    store_partial_vecs(cur, staged);  // this row's partial vectors, loaded one row ago
    if (row + row_step < rows) {
      staged = stage(nxt, row + row_step);
    } else {
      commit_copies();  // an empty group keeps every thread's group count in step
      staged.head_slot = staged.tail_slot = -1;
    }
    const int64_t y = targets[row];
    RowScalars scalars{0.f, 0.f, 0.f, 0.f};
    if (threadIdx.x == 0) scalars = load_row_scalars(io, row, p, true);
    wait_copies<1>();  // this thread's copies of `row` have landed; only the next row's group may be in flight
    RowStats st = sweep_slice_stats<T, 4>(cur, rv, vocab, k_lo, k_hi, threadIdx.x, blockDim.x, c);
    st = block_stats_reduce(st, c);  // ends with __syncthreads: the whole slice is visible to the CTA
    // cache element j holds column j + k_lo·kVec - pre: src[col] is that column's logit
    const T* src = reinterpret_cast<const T*>(cur) - (k_lo * kVec - rv.pre);
    const int owner = target_owner(y, vocab, p.ignore_index, rv.pre, kVec, vecs_per_cta);
    SliceShare& mine = share[i & 1];
    if (threadIdx.x == 0) mine = SliceShare{st, owner == rank ? to_float(src[y]) : 0.f};
    // Each peer reads this buffer's `share` after this barrier and before arriving at the next row's, and this CTA
    // rewrites it two rows later, past that next barrier: no second barrier per row is needed.
    cluster.sync();
    if (threadIdx.x == 0) {
      RowStats total = stats_init();  // rank order: the same bits in every CTA of the cluster
      for (int r = 0; r < csize; ++r) total = stats_merge(total, cluster.map_shared_rank(&mine, r)->st, c);
      const float xy = owner >= 0 ? cluster.map_shared_rank(&mine, owner)->xy : 0.f;
      finish_ppo_row(xy, y, vocab, total, scalars, p, io, row, rank == 0, true, tok);
      SharedStash<false>::put(mul_rn(xy, p.inv_t));  // sweep 2's target column (write_row_range)
    }
    __syncthreads();
    const int64_t c_lo = max(k_lo * kVec - rv.pre, int64_t(0));
    const int64_t c_hi = min(k_hi * kVec - rv.pre, vocab);
    T* dx = row_ptr(grad, row, rows_inner, grad_stride_b, grad_stride_t);
    if (y == p.ignore_index) {
      zero_row_range(dx, c_lo, c_hi, threadIdx.x, blockDim.x);
    } else {
      const LogprobGrad f = make_logprob_grad(tok[0], tok[1], tok[2], tok[3], p.inv_t);
      if constexpr (kNoEntropy) {
        write_row_range<SharedStash<false>>(dx, src, c_lo, c_hi, p.inv_t, y, threadIdx.x, blockDim.x, LogprobGradNoEntropy(f));
      } else {
        write_row_range<SharedStash<false>>(dx, src, c_lo, c_hi, p.inv_t, y, threadIdx.x, blockDim.x, f);
      }
    }
    __syncthreads();  // `cur` and tok are free: the next row stages into `cur`'s buffer
  }
  cluster.sync();  // the peers may still read this CTA's `share` of its last row
#endif
}

template <typename T>
__global__ void scale_unless_one_kernel(T* __restrict__ x, int64_t n, const float* __restrict__ scale,
                                        bool aligned) {
  constexpr int kVec = Vec<T>::kSize;
  const float s = *scale;
  if (s == 1.f) return;  // the common loss.backward(): no memory traffic at all
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t nvec = aligned ? n / kVec : 0;
  for (int64_t i = tid; i < nvec; i += step) {
    Vec<T> v;
    v.raw = reinterpret_cast<const uint4*>(x)[i];
#pragma unroll
    for (int j = 0; j < kVec; ++j) v.elems[j] = from_float<T>(to_float(v.elems[j]) * s);
    reinterpret_cast<uint4*>(x)[i] = v.raw;
  }
  for (int64_t i = nvec * kVec + tid; i < n; i += step) x[i] = from_float<T>(to_float(x[i]) * s);
}

// The launch of `clusters` 1-D clusters of `cluster` CTAs for cudaLaunchKernelEx; `attribute` (the cluster shape)
// belongs to the caller and must outlive the launch.
inline cudaLaunchConfig_t cluster_launch(int64_t clusters, int cluster, int threads, size_t smem, cudaStream_t stream,
                                         cudaLaunchAttribute& attribute) {
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(clusters * cluster));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

// Launches kPipe's persistent grid: as many clusters as can be resident at once (cudaOccupancyMaxActiveClusters;
// the SM count over the cluster size if the query fails), at most one per row. More clusters than fit would
// still be correct, only no longer persistent.
template <typename T, bool kNoEntropy>
cudaError_t launch_ppo_pipe(const PpoPlan& plan, int64_t per_cta, const T* x, const int64_t* targets,
                            const PpoOutputs& io, T* dx, int64_t rows, int64_t rows_inner, int64_t stride_b,
                            int64_t stride_t, int64_t grad_stride_b, int64_t grad_stride_t, int64_t vocab,
                            const PpoParams& params, cudaStream_t stream) {
  const auto kernel = ppo_fwd_pipe_kernel<T, kNoEntropy>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attribute;
  // one cluster for the query (it wants a whole number of them); the grid is set below
  cudaLaunchConfig_t config =
      cluster_launch(1, plan.cluster, plan.threads, static_cast<size_t>(plan.smem_bytes), stream, attribute);
  int device = 0;
  cudaGetDevice(&device);
  // The query's answer depends only on the device and the plan: remembered for the last one asked (per thread,
  // per dtype), so a training loop pays for it once.
  struct ActiveClusters {
    int device, cluster, threads;
    int64_t smem;
    int active;
  };
  thread_local ActiveClusters known{-1, 0, 0, 0, 0};
  if (known.device != device || known.cluster != plan.cluster || known.threads != plan.threads ||
      known.smem != plan.smem_bytes) {
    int sms = 0, active = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (cudaOccupancyMaxActiveClusters(&active, kernel, &config) != cudaSuccess || active < 1) {
      cudaGetLastError();  // a failed query must not look like a launch error later
      active = std::max(1, sms / plan.cluster);
    }
    known = {device, plan.cluster, plan.threads, plan.smem_bytes, active};
  }
  const int active = known.active;
  const int64_t clusters = std::min<int64_t>(rows, active);
  config.gridDim = dim3(static_cast<unsigned>(clusters * plan.cluster));
  err = cudaLaunchKernelEx(&config, kernel, x, targets, io, dx, rows, rows_inner, stride_b, stride_t, grad_stride_b,
                           grad_stride_t, vocab, params, per_cta);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T>
int64_t elem_size() {
  return static_cast<int64_t>(sizeof(T));
}

}  // namespace

PpoPlan plan_ppo(DType dtype, int64_t vocab, PpoPath requested, bool with_grad, int device) {
  PpoPlan plan{PpoPath::kGlobal, 1, 32, 0};
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t nvec = vectors_per_row<T>(vocab);
    plan.threads = forward_threads(nvec, kPpoForwardCap);
    if (!with_grad) {
      plan.path = PpoPath::kForwardOnly;
      return cudaSuccess;
    }
    int optin = 0, per_sm = 0, major = 0;
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    // two CTAs per SM (loads of one overlap the other's second sweep), minus static smem and reserve
    const int64_t budget = std::min<int64_t>(optin, per_sm / 2) - 2048;
    cudaFuncAttributes attr{};
    const bool cluster_built = cudaFuncGetAttributes(&attr, ppo_fwd_kernel<T, true>) == cudaSuccess &&
                               attr.binaryVersion >= 90;
    cudaGetLastError();  // a failed query must not look like a launch error later
    const bool cluster_ok = major >= 9 && cluster_built;
    const int64_t row_bytes = nvec * 16;
    auto shared_plan = [&]() -> bool {
      if (row_bytes > budget) return false;
      plan = {PpoPath::kShared, 1, forward_threads(nvec, kPpoFusedCap), row_bytes};
      return true;
    };
    // kL2: CTAs per SM whose rows fit in half of L2 (the other half holds the gradient's lines on their way
    // out), 1 to 4; the cap comes from each CTA asking for a 1/ctas share of the SM's shared memory
    auto l2_plan = [&]() {
      int l2 = 0, sms = 0;
      cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device);
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      const int64_t fit = sms > 0 ? (static_cast<int64_t>(l2) / 2) / (row_bytes * sms) : 1;
      const int64_t ctas = std::max<int64_t>(1, std::min<int64_t>(fit, 4));
      const int64_t pad = std::min<int64_t>(per_sm / ctas, optin) - 2048;
      plan = {PpoPath::kL2, 1, forward_threads(nvec, kPpoL2Cap), std::max<int64_t>(pad, 0)};
    };
    // kPipe: the smallest cluster whose two slice buffers fit one CTA's shared memory (one CTA per SM)
    auto pipe_plan = [&](int min_size) -> bool {
      if (!cluster_ok) return false;
      for (int c = min_size; c <= 8; c *= 2) {
        const int64_t per = (nvec + c - 1) / c;
        if (2 * per * 16 <= optin - 2048) {
          plan = {PpoPath::kPipe, c, forward_threads(per, kPpoPipeCap), 2 * per * 16};
          return true;
        }
      }
      return false;
    };
    auto cluster_plan = [&](int min_size) -> bool {
      if (!cluster_ok) return false;
      for (int c = min_size; c <= 8; c *= 2) {
        const int64_t per = (nvec + c - 1) / c;
        if (per * 16 <= budget) {
          plan = {PpoPath::kCluster, c, forward_threads(per, kPpoFusedCap), per * 16};
          return true;
        }
      }
      return false;
    };
    bool done = false;
    switch (requested) {
      case PpoPath::kShared:
        done = shared_plan();
        break;
      case PpoPath::kCluster:
        done = cluster_plan(min_cluster_size());
        break;
      case PpoPath::kGlobal:
        plan = {PpoPath::kGlobal, 1, forward_threads(nvec, kPpoFusedCap), 0};
        return cudaSuccess;
      case PpoPath::kL2:
        l2_plan();
        return cudaSuccess;
      case PpoPath::kPipe:
        done = pipe_plan(min_cluster_size());
        break;
      default:
        done = shared_plan() || cluster_plan(min_cluster_size());
        if (!done) {
          plan = {PpoPath::kGlobal, 1, forward_threads(nvec, kPpoFusedCap), 0};
          return cudaSuccess;
        }
    }
    if (!done) plan = {PpoPath::kGlobal, 0, forward_threads(nvec, kPpoFusedCap), 0};  // cluster = 0: the forced path cannot run
    return cudaSuccess;
  });
  return plan;
}

namespace {

// Launches ppo_fwd_kernel<T, ·, kProbe, kNoEntropy, kBulk> for a kGlobal / kShared / kCluster / kL2 plan (kPipe has
// its own kernel; kBulk only for kShared / kCluster).
template <typename T, bool kProbe, bool kNoEntropy, bool kBulk = false>
cudaError_t launch_ppo_rows(const PpoPlan& plan, int64_t per_cta, const T* x, const int64_t* targets,
                            const PpoOutputs& io, T* dx, int64_t rows, int64_t rows_inner, int64_t stride_b,
                            int64_t stride_t, int64_t grad_stride_b, int64_t grad_stride_t, int64_t vocab,
                            const PpoParams& params, std::conditional_t<kProbe, PpoProbe, NoProbe> probe,
                            cudaStream_t stream) {
  const bool in_smem = plan.path == PpoPath::kShared || plan.path == PpoPath::kCluster;
  const bool prefetch = in_smem && prefetch_mode() != kPrefetchOff;  // (the kBulk kernel ignores it)
  if (in_smem && per_cta * 16 > plan.smem_bytes) return cudaErrorInvalidValue;
  if (kBulk && !in_smem) return cudaErrorInvalidValue;
  // (the bulk kernel's launch bounds: any CTA size gives the same results as the other sweeps at that size)
  const int threads = kBulk && plan.threads > kBulkMaxThreads ? kBulkMaxThreads : plan.threads;
  // kL2 asks for shared memory it does not use: the request caps its CTAs per SM (plan_ppo)
  const size_t smem = in_smem || plan.path == PpoPath::kL2 ? static_cast<size_t>(plan.smem_bytes) : 0;
  const bool reverse = plan.path == PpoPath::kL2;
  if (plan.path != PpoPath::kCluster) {
    const auto kernel = ppo_fwd_kernel<T, false, kProbe, kNoEntropy, kBulk>;
    if (smem > 48 * 1024) {
      const cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(
        x, targets, io, dx, rows_inner, stride_b, stride_t, grad_stride_b, grad_stride_t, vocab, params, per_cta,
        in_smem, prefetch, reverse, probe);
    return cudaGetLastError();
  }
  if (plan.cluster > kMaxClusterCtas) return cudaErrorInvalidValue;
  const auto kernel = ppo_fwd_kernel<T, true, kProbe, kNoEntropy, kBulk>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess && plan.cluster > 8) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  }
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_launch(rows, plan.cluster, threads, smem, stream, attribute);
  err = cudaLaunchKernelEx(&config, kernel, x, targets, io, dx, rows_inner, stride_b, stride_t, grad_stride_b,
                           grad_stride_t, vocab, params, per_cta, true, prefetch, false, probe);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// Whether an on-chip plan takes the bulk-copy sweep (RLHF_KERNELS_CUDA_PREFETCH=bulk): only where its kernels were
// compiled for sm_90+ (the binary the device runs, one for every instantiation; a PTX-only sm_80 build JIT-compiled on
// an H100 has no bulk copies), else the cp.async sweep runs instead, as the setting's documentation says.
template <typename T>
bool bulk_copies_run(const PpoPlan& plan) {
  if ((plan.path != PpoPath::kShared && plan.path != PpoPath::kCluster) || prefetch_mode() != kPrefetchBulk) {
    return false;
  }
  cudaFuncAttributes attr{};
  const bool ok = cudaFuncGetAttributes(&attr, ppo_fwd_kernel<T, false, false, false, true>) == cudaSuccess &&
                  attr.binaryVersion >= 90;
  cudaGetLastError();  // a failed query must not look like a launch error later
  return ok;
}

}  // namespace

cudaError_t launch_ppo_fwd(DType dtype, const PpoPlan& plan, const void* logits, const int64_t* targets,
                           const float* old_logp, const float* advantages, const float* ref_logp,
                           const float* weights, float* term, float* logp, float* entropy, float* kl, float* clipped,
                           float* lse, void* grad, int64_t rows_outer, int64_t rows_inner, int64_t stride_b,
                           int64_t stride_t, int64_t grad_stride_b, int64_t grad_stride_t, int64_t vocab,
                           const PpoParams& params, cudaStream_t stream, const PpoProbe* probe) {
  const int64_t rows = rows_outer * rows_inner;
  if (rows == 0) return cudaSuccess;
  if (vocab < 1 || plan.cluster < 1 || (grad != nullptr) != (weights != nullptr) ||
      (plan.path == PpoPath::kForwardOnly) != (grad == nullptr) || (params.has_ref && ref_logp == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (rows * plan.cluster > kMaxGridX) return cudaErrorInvalidValue;
  const PpoOutputs io{old_logp, advantages, ref_logp, weights, term, logp, entropy, kl, clipped, lse};
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const int64_t nvec = vectors_per_row<T>(vocab);
    const auto* x = static_cast<const T*>(logits);
    auto* dx = static_cast<T*>(grad);
    const int64_t per_cta = (nvec + plan.cluster - 1) / plan.cluster;
    // no entropy bonus: every row's G_H is 0 (or NaN with its weight, which the full formula gives too)
    const bool no_entropy = dx != nullptr && params.entropy_coef == 0.f;
    if (plan.path == PpoPath::kPipe) {
      if (probe != nullptr) return cudaErrorNotSupported;  // the probe stamps one row per CTA
      if (2 * per_cta * 16 > plan.smem_bytes || plan.cluster > 8) return cudaErrorInvalidValue;
      const auto launch = no_entropy ? launch_ppo_pipe<T, true> : launch_ppo_pipe<T, false>;
      return launch(plan, per_cta, x, targets, io, dx, rows, rows_inner, stride_b, stride_t, grad_stride_b,
                    grad_stride_t, vocab, params, stream);
    }
    if (probe != nullptr) {
      const bool cluster_only = probe->skip & (kProbeCopySweep2 | kProbePushExchange | kProbeRelaxedArrive);
      if (cluster_only && plan.path != PpoPath::kCluster) return cudaErrorNotSupported;
      if ((probe->skip & kProbePushExchange) && plan.cluster > kProbeMaxCluster) return cudaErrorNotSupported;
      const auto launch = no_entropy ? launch_ppo_rows<T, true, true> : launch_ppo_rows<T, true, false>;
      return launch(plan, per_cta, x, targets, io, dx, rows, rows_inner, stride_b, stride_t, grad_stride_b,
                    grad_stride_t, vocab, params, *probe, stream);
    }
    if (plan.path == PpoPath::kForwardOnly) {
      ppo_fwd_only_kernel<T><<<static_cast<unsigned>(rows), plan.threads, 0, stream>>>(
          x, targets, io, rows_inner, stride_b, stride_t, vocab, params);
      return cudaGetLastError();
    }
    const bool bulk = bulk_copies_run<T>(plan);
    const auto launch = no_entropy ? (bulk ? launch_ppo_rows<T, false, true, true> : launch_ppo_rows<T, false, true>)
                                   : (bulk ? launch_ppo_rows<T, false, false, true> : launch_ppo_rows<T, false, false>);
    return launch(plan, per_cta, x, targets, io, dx, rows, rows_inner, stride_b, stride_t, grad_stride_b,
                  grad_stride_t, vocab, params, NoProbe{}, stream);
  });
}

cudaError_t launch_scale_unless_one(DType dtype, void* x, int64_t n, const float* scale, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    int device = 0, sms = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    constexpr int kThreads = 256;
    const int64_t vecs = (n + Vec<T>::kSize - 1) / Vec<T>::kSize;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((vecs + kThreads - 1) / kThreads, 8 * sms));
    const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
    scale_unless_one_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<T*>(x), n, scale,
                                                                                       aligned);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace rlhf_kernels
