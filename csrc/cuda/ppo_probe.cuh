// The fused PPO kernel's probe (ppo.cu's ppo_fwd_kernel<T, kCluster, kProbe = true>): where a CTA's time goes,
// for benchmarks/probe_ppo.py. Issue 9's fused forward-with-gradient runs at ~65% of its one-read-one-write floor
// on an H200 with every CTA resident (ncu: 36.7% achieved of 37.5% occupancy) and neither the SM nor DRAM
// saturated (57% / 54%), so aggregate counters do not say which part of a CTA's life leaves DRAM idle. The probe
// answers it two ways, both with the production kernel's code:
//   stamps  thread 0 of every CTA records %globaltimer at its start and end, clock64() at each phase boundary
//           (sweep 1 reduced, cluster barrier passed, statistics merged, row finished, sweep 2 written, exit)
//           and its SM: per-phase durations, per-SM residency, and the SM time during which no resident CTA
//           was moving data;
//   skips   leave one stage out (the cluster exchange, thread 0's row tail, sweep 2) or replace sweep 2's
//           gradient with a plain copy of the cached logits, so CUDA-event times of the variants, taken
//           differences of, price each stage (results are wrong then: timing only); two more bits swap in
//           alternatives with the same results (kProbePushExchange: statistics pushed to the peers, no closing
//           barrier; kProbeRelaxedArrive: the closing arrive without its release fence), to time a candidate
//           before it replaces the production code.
// The production instantiations (kProbe = false) take an empty NoProbe instead and compile to the same code.
// CUDA headers only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"
#include "row_grad.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace detail {

// The probe's kernel argument in the production instantiations: nothing.
struct NoProbe {};

// Whether the probe leaves stage `bit` out (ProbeSkip): never in production. Read from the kernel argument at
// each use rather than kept in a register: the kernel already sits at its 64-register bound.
__device__ __forceinline__ constexpr bool probe_skips(const NoProbe&, unsigned) { return false; }
__device__ __forceinline__ bool probe_skips(const PpoProbe& probe, unsigned bit) { return (probe.skip & bit) != 0; }

__device__ __forceinline__ unsigned long long probe_global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned long long probe_sm_id() {
  unsigned s;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
  return s;
}

// Thread 0 writes stamp `slot` of this CTA (one row of kProbeSlots in probe.stamps, by blockIdx.x):
// clock64() for the phase slots, the global timer and the SM id for theirs.
__device__ __forceinline__ void probe_mark(const PpoProbe& probe, int slot) {
  if (probe.stamps == nullptr || threadIdx.x != 0) return;
  unsigned long long* row = probe.stamps + static_cast<int64_t>(blockIdx.x) * kProbeSlots;
  if (slot == kProbeStartNs || slot == kProbeEndNs) {
    row[slot] = probe_global_ns();
  } else if (slot == kProbeSm) {
    row[slot] = probe_sm_id();
  } else {
    row[slot] = static_cast<unsigned long long>(clock64());
  }
}

// Sweep 2's column function in the probe: the log-prob gradient F, or under kProbeCopySweep2 the cached logit written
// back unchanged (with inv_t = 1), the gradient's arithmetic left out and every load and store kept. One function with
// a select, not a second write_row_range: a second copy of the loop spilled (16 bytes of stack).
template <typename F>
struct ProbeGrad {
  F grad;
  bool copy;
  __device__ __forceinline__ float operator()(float z, bool is_target) const {
    return copy ? z : grad(z, is_target);
  }
};

}  // namespace detail
}  // namespace cuda
}  // namespace rlhf_kernels
