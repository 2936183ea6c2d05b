// CPU exact full-vocabulary KL kernels (see kl.cpp for the math).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlhf_kernels {
namespace cpu {

// logits, ref_logits [B, T, V] (vocab stride 1, any row strides)
// -> (kl, lse_z, lse_r), each [B, T] float32 (float64 when an input is float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_divergence_fwd(const at::Tensor& logits,
                                                                 const at::Tensor& ref_logits, double temperature);

// -> (dlogits, dref_logits) in the inputs' dtypes; dref_logits is empty unless need_ref_grad. With grad_out /
// ref_grad_out (shaped like the inputs, their dtypes, vocab stride 1, any row strides) the gradients are
// written there and empty tensors come back in their place.
std::tuple<at::Tensor, at::Tensor> kl_divergence_bwd(const at::Tensor& grad, const at::Tensor& logits,
                                                     const at::Tensor& ref_logits, const at::Tensor& kl,
                                                     const at::Tensor& lse_z, const at::Tensor& lse_r,
                                                     double temperature, bool need_ref_grad,
                                                     const std::optional<at::Tensor>& grad_out,
                                                     const std::optional<at::Tensor>& ref_grad_out);

}  // namespace cpu
}  // namespace rlhf_kernels
