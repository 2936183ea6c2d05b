// GAE on the GPU: each thread owns one sequence and scans it backwards.
//   δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t,   A_t = δ_t + γλ·A_{t+1}·m_{t+1},
//   returns = A + V; both 0 where m_t == 0, and a masked step adds nothing to the others whatever its r_t and V_t
//   hold (padding's NaN / inf: 0·inf would be NaN).
// The scan is sequential in t, but B sequences run in parallel and the
// whole [B, T] problem is one launch instead of T Python iterations.
#include "launchers.h"

namespace rlhf_kernels {
namespace cuda {
namespace {

__global__ void gae_fwd_kernel(const float* __restrict__ rewards, const float* __restrict__ values,
                               const float* __restrict__ mask, float* __restrict__ advantages,
                               float* __restrict__ returns, int64_t batch, int64_t seq_len, float gamma,
                               float gamma_lam) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int64_t offset = b * seq_len;
  float next_value = 0.f, next_adv = 0.f, next_mask = 0.f;
  for (int64_t t = seq_len - 1; t >= 0; --t) {
    const float v = values[offset + t];
    const float m = mask[offset + t];
    const float delta = rewards[offset + t] + gamma * next_value * next_mask - v;
    const float a = delta + gamma_lam * next_adv * next_mask;
    const bool live = m != 0.f;
    advantages[offset + t] = live ? a * m : 0.f;
    returns[offset + t] = live ? (a + v) * m : 0.f;
    // a masked step passes nothing back: padding's V or r may be NaN / inf, and 0·inf is NaN
    next_value = live ? v : 0.f;
    next_adv = live ? a : 0.f;
    next_mask = m;
  }
}

}  // namespace

cudaError_t launch_gae_fp32(const float* rewards, const float* values, const float* mask, float* advantages,
                            float* returns, int64_t batch, int64_t seq_len, float gamma, float lam,
                            cudaStream_t stream) {
  if (batch == 0 || seq_len == 0) return cudaSuccess;
  constexpr int kThreads = 128;
  const int64_t blocks = (batch + kThreads - 1) / kThreads;
  gae_fwd_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      rewards, values, mask, advantages, returns, batch, seq_len, gamma, gamma * lam);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rlhf_kernels
