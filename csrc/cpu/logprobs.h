// CPU log-prob + entropy kernels (see logprobs.cpp for the math).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <type_traits>

namespace rlhf_kernels {
namespace cpu {

// Per-token statistics are float32, or float64 for float64 logits (gradcheck).
template <typename scalar_t>
using float_or_double_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// logits [B, T, V] (vocab stride 1, any row strides), targets int64 [B*T] contiguous
// -> (logp, entropy, lse), each [B, T].
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd(
    const at::Tensor& logits, const at::Tensor& targets, double temperature, int64_t ignore_index);

// -> dlogits [B, T, V] contiguous, in the logits dtype.
at::Tensor logprobs_bwd(
    const at::Tensor& grad_logp,
    const at::Tensor& grad_entropy,
    const at::Tensor& logits,
    const at::Tensor& targets,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    double temperature,
    int64_t ignore_index);

// The same gradient written into `grad`: shaped like logits, its dtype, vocab stride 1, any
// row strides (e.g. rows [a, a + T) of the gradient of the [B, T+1, V] logits).
void logprobs_bwd_out(
    const at::Tensor& grad_logp,
    const at::Tensor& grad_entropy,
    const at::Tensor& logits,
    const at::Tensor& targets,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    double temperature,
    int64_t ignore_index,
    at::Tensor& grad);

}  // namespace cpu
}  // namespace rlhf_kernels
