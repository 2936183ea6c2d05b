// Torch-side checks and buffers shared by the CPU and CUDA bindings of the row kernels: the [B, T, V] rows,
// per-row tensors, caller-provided gradient outputs, and kl_divergence's inputs and gradients.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>
#include <utility>

namespace rlhf_kernels {
namespace io {

// `rows` is [B, T, V] with unit vocab stride, on a `device` device.
inline void check_rows(const at::Tensor& rows, const char* name, at::DeviceType device) {
  TORCH_CHECK(rows.dim() == 3, name, " must be viewed as [B, T, V], got ", rows.sizes());
  TORCH_CHECK(rows.stride(2) == 1, name, " must have unit stride over the vocabulary");
  TORCH_CHECK(rows.device().type() == device, name, " must be a ", c10::DeviceTypeName(device),
              " tensor for these kernels, got ", rows.device());
}

// A per-row tensor: [B·T] elements, contiguous, of `dtype`, on the rows' device.
inline at::Tensor per_row(const at::Tensor& t, int64_t rows, at::ScalarType dtype, const at::Tensor& like,
                          const char* name) {
  TORCH_CHECK(t.numel() == rows, name, " must have B*T = ", rows, " elements, got ", t.numel());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  return t.to(dtype).contiguous();
}

// A caller-provided gradient: shaped like `like`, its dtype and device, vocab stride 1, any row strides.
inline void check_grad_out(const at::Tensor& grad, const at::Tensor& like, const char* name) {
  TORCH_CHECK(grad.sizes() == like.sizes() && grad.scalar_type() == like.scalar_type() && grad.stride(2) == 1 &&
                  grad.device() == like.device(),
              name, " must be shaped like ", like.sizes(), " of ", like.scalar_type(), " on ", like.device(),
              " with unit vocab stride, got ", grad.sizes(), " ", grad.scalar_type(), " strides ", grad.strides());
}

// A caller-provided gradient may be the tensor `x` it is the gradient of (written over it: the kernels read every
// element before they write it; overwrite_logits=True) or lie apart from it, never over only part of it: a gradient
// written over other logits would be read back as logits.
inline void check_not_partly_over(const at::Tensor& grad, const at::Tensor& x, const char* name,
                                  const char* x_name = "logits") {
  if (grad.numel() == 0 || x.numel() == 0 || !grad.storage().is_alias_of(x.storage())) return;
  if (grad.data_ptr() == x.data_ptr() && grad.sizes() == x.sizes() && grad.strides() == x.strides()) return;
  // any overlap of the two byte ranges counts (strided rows leave gaps that could interleave, but a gradient
  // written between the logits is never meant)
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* begin = static_cast<const char*>(t.data_ptr());
    return std::make_pair(begin, begin + (last + 1) * t.element_size());
  };
  const auto a = span(grad), b = span(x);
  TORCH_CHECK(!(a.first < b.second && b.first < a.second), name, " may overlap ", x_name, " only by being ", x_name,
              " itself");
}

// kl_divergence's statistics dtype: float64 when an input is float64, else float32.
inline at::ScalarType kl_stats_dtype(const at::Tensor& logits, const at::Tensor& ref_logits) {
  return logits.scalar_type() == at::kDouble || ref_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// kl_divergence's rows: checked, and for mixed dtypes (a bf16 policy against an fp32 reference) copies in the
// statistics dtype (the CUDA kernels then reject float64 by name).
inline std::pair<at::Tensor, at::Tensor> kl_inputs(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                   at::DeviceType device) {
  check_rows(logits, "logits", device);
  check_rows(ref_logits, "ref_logits", device);
  TORCH_CHECK(logits.sizes() == ref_logits.sizes(), "logits and ref_logits must have one shape, got ", logits.sizes(),
              " and ", ref_logits.sizes());
  TORCH_CHECK(logits.device() == ref_logits.device(), "logits and ref_logits must be on one device");
  if (logits.scalar_type() == ref_logits.scalar_type()) return {logits, ref_logits};
  const auto dtype = kl_stats_dtype(logits, ref_logits);
  return {logits.to(dtype), ref_logits.to(dtype)};
}

// Where kl_divergence's backward writes: into grad_out / ref_grad_out directly when they have the computed
// dtype (that of x / r), else into fresh [B, T, V] buffers; dr is empty unless need_ref_grad.
struct KlGrads {
  at::Tensor dz, dr;
  bool dz_direct, dr_direct;
};

inline KlGrads kl_grad_buffers(const at::Tensor& logits, const at::Tensor& ref_logits, const at::Tensor& x,
                               const at::Tensor& r, bool need_ref_grad, const std::optional<at::Tensor>& grad_out,
                               const std::optional<at::Tensor>& ref_grad_out) {
  // a gradient may be written over the input it is the gradient of (kl_divergence(overwrite_logits=True): every
  // column of both inputs is read before its gradient is written), never over part of either input
  if (grad_out.has_value()) {
    check_grad_out(*grad_out, logits, "grad_out");
    check_not_partly_over(*grad_out, logits, "grad_out");
    check_not_partly_over(*grad_out, ref_logits, "grad_out", "ref_logits");
  }
  if (need_ref_grad && ref_grad_out.has_value()) {
    check_grad_out(*ref_grad_out, ref_logits, "ref_grad_out");
    check_not_partly_over(*ref_grad_out, ref_logits, "ref_grad_out", "ref_logits");
    check_not_partly_over(*ref_grad_out, logits, "ref_grad_out");
  }
  KlGrads out;
  out.dz_direct = grad_out.has_value() && grad_out->scalar_type() == x.scalar_type();
  out.dr_direct = need_ref_grad && ref_grad_out.has_value() && ref_grad_out->scalar_type() == r.scalar_type();
  out.dz = out.dz_direct ? *grad_out : at::empty(x.sizes(), x.options());
  out.dr = out.dr_direct ? *ref_grad_out
                         : (need_ref_grad ? at::empty(r.sizes(), r.options()) : at::empty({0}, ref_logits.options()));
  return out;
}

// The op's result: with grad_out / ref_grad_out, the gradients copied there (unless written directly) and empty
// tensors in their place; else the buffers in the inputs' dtypes.
inline std::tuple<at::Tensor, at::Tensor> kl_grad_result(KlGrads g, const at::Tensor& logits,
                                                         const at::Tensor& ref_logits, bool need_ref_grad,
                                                         const std::optional<at::Tensor>& grad_out,
                                                         const std::optional<at::Tensor>& ref_grad_out) {
  if (grad_out.has_value()) {
    if (!g.dz_direct) grad_out->copy_(g.dz);
    g.dz = at::empty({0}, logits.options());
  } else if (g.dz.scalar_type() != logits.scalar_type()) {
    g.dz = g.dz.to(logits.scalar_type());
  }
  if (need_ref_grad && ref_grad_out.has_value()) {
    if (!g.dr_direct) ref_grad_out->copy_(g.dr);
    g.dr = at::empty({0}, ref_logits.options());
  } else if (need_ref_grad && g.dr.scalar_type() != ref_logits.scalar_type()) {
    g.dr = g.dr.to(ref_logits.scalar_type());
  }
  return {g.dz, g.dr};
}

}  // namespace io
}  // namespace rlhf_kernels
