// The target check's range on the GPU: [min, max] of the targets, ignore_index counted as 0, in one kernel.
// Every target is valid iff 0 <= min and max < V (ops/_deferred_checks.py: PendingRange copies the pair into pinned
// host memory behind an event and reads it once the op's own kernel is queued).
//
// Why a kernel of its own: in PyTorch the range was four small kernels (==, where, aminmax, stack), each a Python
// call, on every logprobs / ppo_loss call with the default check, beside a micro-batch kernel of ~0.2 ms that the
// host time bounds (H200, run 5). One CTA: tens of thousands of targets at a micro-batch; min and max do not depend
// on the order.
#include <climits>

#include "launchers.h"
#include "row_common.cuh"

namespace rlhf_kernels {
namespace cuda {
namespace {

using detail::block_reduce;

constexpr int kRangeThreads = 512;

struct TargetRange {
  long long lo, hi;
};

__global__ void __launch_bounds__(kRangeThreads)
    target_range_kernel(const int64_t* __restrict__ targets, int64_t n, int64_t ignore_index,
                        int64_t* __restrict__ range) {
  TargetRange r{LLONG_MAX, LLONG_MIN};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const long long y = targets[i] == ignore_index ? 0 : targets[i];
    r = {y < r.lo ? y : r.lo, y > r.hi ? y : r.hi};
  }
  r = block_reduce(
      r, TargetRange{LLONG_MAX, LLONG_MIN},
      [](const TargetRange& a, const TargetRange& b) {
        return TargetRange{a.lo < b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi};
      },
      [](const TargetRange& a, int off) {
        return TargetRange{__shfl_xor_sync(0xffffffffu, a.lo, off), __shfl_xor_sync(0xffffffffu, a.hi, off)};
      });
  if (threadIdx.x == 0) {
    range[0] = n > 0 ? r.lo : 0;  // no targets: nothing out of range
    range[1] = n > 0 ? r.hi : 0;
  }
}

}  // namespace

cudaError_t launch_target_range(const int64_t* targets, int64_t n, int64_t ignore_index, int64_t* range,
                                cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  target_range_kernel<<<1, kRangeThreads, 0, stream>>>(targets, n, ignore_index, range);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rlhf_kernels
