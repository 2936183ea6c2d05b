// CPU generalised advantage estimation (reverse scan per sequence).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace rlhf_kernels {
namespace cpu {

// rewards, values, mask: [B, T] -> (advantages, returns), [B, T] in the values dtype.
std::tuple<at::Tensor, at::Tensor> gae(
    const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma, double lam);

}  // namespace cpu
}  // namespace rlhf_kernels
