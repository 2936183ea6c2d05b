// Host-side launchers of the CUDA kernels: plain pointers and sizes only,
// so the .cu files need no torch headers and compile in seconds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace rlhf_kernels {
namespace cuda {

// GAE reverse scan, one thread per sequence; all arrays [B, T] contiguous fp32.
cudaError_t launch_gae_fp32(const float* rewards, const float* values, const float* mask, float* advantages,
                            float* returns, int64_t batch, int64_t seq_len, float gamma, float lam,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace rlhf_kernels
