// Torch-facing bindings of the compiled kernels.
//
// Raw kernels live in the `rlhf_kernels_C` operator namespace; the public,
// differentiable ops (`rlhf_kernels::*`) are registered from Python with
// torch.library.custom_op and call these.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/advantages.h"
#include "cpu/logprobs.h"

#ifdef RLHF_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"
#endif

#ifndef RLHF_KERNELS_CUDA_ARCHS
#define RLHF_KERNELS_CUDA_ARCHS ""
#endif
#ifndef RLHF_KERNELS_CPU_CAPABILITY
#define RLHF_KERNELS_CPU_CAPABILITY "default"
#endif

namespace rlhf_kernels {

#ifdef RLHF_KERNELS_WITH_CUDA
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK(values.dim() == 2, "values must be [B, T], got ", values.sizes());
  TORCH_CHECK(rewards.sizes() == values.sizes() && mask.sizes() == values.sizes(),
              "rewards, values and mask must share one [B, T] shape");
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor r = rewards.to(at::kFloat).contiguous();
  const at::Tensor v = values.to(at::kFloat).contiguous();
  const at::Tensor m = mask.to(at::kFloat).contiguous();
  at::Tensor adv = at::empty_like(v);
  at::Tensor ret = at::empty_like(v);
  const cudaError_t err = cuda::launch_gae_fp32(
      r.const_data_ptr<float>(), v.const_data_ptr<float>(), m.const_data_ptr<float>(), adv.data_ptr<float>(),
      ret.data_ptr<float>(), v.size(0), v.size(1), static_cast<float>(gamma), static_cast<float>(lam),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gae CUDA kernel failed: ", cudaGetErrorString(err));
  return {adv.to(values.scalar_type()), ret.to(values.scalar_type())};
}

}  // namespace
#endif

}  // namespace rlhf_kernels

TORCH_LIBRARY(rlhf_kernels_C, m) {
  m.def("logprobs_fwd(Tensor logits, Tensor targets, float temperature, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor targets, Tensor lse, "
      "Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CPU, m) {
  m.impl("logprobs_fwd", &rlhf_kernels::cpu::logprobs_fwd);
  m.impl("logprobs_bwd", &rlhf_kernels::cpu::logprobs_bwd);
  m.impl("gae", &rlhf_kernels::cpu::gae);
}

#ifdef RLHF_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(rlhf_kernels_C, CUDA, m) {
  m.impl("gae", &rlhf_kernels::gae_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "rlhf_kernels compiled kernels (ops are registered under torch.ops.rlhf_kernels_C)";
  module.def("compiled_with_cuda", [] {
#ifdef RLHF_KERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  module.def("cuda_arch_list", [] { return std::string(RLHF_KERNELS_CUDA_ARCHS); });
  module.def("cpu_capability", [] { return std::string(RLHF_KERNELS_CPU_CAPABILITY); });
}
