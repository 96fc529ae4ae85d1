// Argument checks and operator registration of the fused losses (namespace sfd_fast_C).
//
// Every op is registered with TORCH_LIBRARY so torch.compile and CUDA graphs see one opaque
// op; sfd_fast/core/cuda_ext.py adds the fake (shape) functions and the autograd formula from
// Python (hence set_python_module). The same checked functions are registered for CPU so a
// CPU tensor gets "must be a CUDA tensor" instead of the dispatcher's "could not run" error.

#include <torch/extension.h>

#include <cmath>

#include "fused_losses.h"

namespace sfd_fast {
namespace {

bool is_float_kind(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// An image batch (B, ...): CUDA, fp32/bf16/fp16, B >= 1, >= 1 element per sample, contiguous.
void check_batch(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(is_float_kind(t.scalar_type()), name, " has dtype ", t.scalar_type(),
              "; allowed: Float (fp32), BFloat16, Half (fp16)");
  TORCH_CHECK(t.dim() >= 2, name, " must have shape (B, ...) with at least 2 dims, got shape ",
              t.sizes());
  TORCH_CHECK(t.size(0) >= 1, name, " is an empty batch (shape ", t.sizes(),
              "); the batch size B must be >= 1");
  TORCH_CHECK(t.numel() > 0, name, " has no elements per sample (shape ", t.sizes(),
              "); every sample needs at least one element");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous()); got shape ",
              t.sizes(), " with strides ", t.strides());
}

// `t` must match the first image input `ref` in device, dtype and shape.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_batch(t, name);
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all inputs must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type(), "; all image inputs must share one dtype");
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " has shape ", t.sizes(), " but ", ref_name,
              " has ", ref.sizes(), "; they must be equal");
}

// A per-sample fp32 vector of shape (B,) on ref's device.
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the images are on ",
              ref.device(), "; all inputs must be on one device");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " has dtype ", t.scalar_type(),
              "; it must be Float (fp32)");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(0), name, " must have shape (B,) = (",
              ref.size(0), ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

void check_grad_total(const at::Tensor& g, const at::Tensor& ref) {
  TORCH_CHECK(g.device() == ref.device(), "grad_total is on ", g.device(), " but the images are on ",
              ref.device());
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.numel() == 1,
              "grad_total must be a one-element Float tensor, got dtype ", g.scalar_type(),
              " and shape ", g.sizes());
}

void check_finite(double v, const char* name) {
  TORCH_CHECK(std::isfinite(v), name, " must be a finite number, got ", v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_fwd(
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, double alpha, double omega_min) {
  check_batch(x_g, "x_g");
  check_like(y_real, "y_real", x_g, "x_g");
  check_like(y_fake, "y_fake", x_g, "x_g");
  check_rows(weight, "weight", x_g);
  check_finite(alpha, "alpha");
  check_finite(omega_min, "omega_min");
  return sid_loss_fwd_cuda(x_g, y_real, y_fake, weight, alpha, omega_min);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_bwd(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, const at::Tensor& per_sample, const at::Tensor& omega, double alpha) {
  check_batch(x_g, "x_g");
  check_like(y_real, "y_real", x_g, "x_g");
  check_like(y_fake, "y_fake", x_g, "x_g");
  check_rows(weight, "weight", x_g);
  check_rows(per_sample, "per_sample", x_g);
  check_rows(omega, "omega", x_g);
  check_grad_total(grad_total, x_g);
  if (grad_per_sample.has_value()) check_rows(*grad_per_sample, "grad_per_sample", x_g);
  check_finite(alpha, "alpha");
  return sid_loss_bwd_cuda(grad_total, grad_per_sample, x_g, y_real, y_fake, weight, per_sample,
                           omega, alpha);
}

std::tuple<at::Tensor, at::Tensor> edm_loss_fwd(const at::Tensor& denoised, const at::Tensor& target,
                                                const at::Tensor& weight) {
  check_batch(denoised, "denoised");
  check_like(target, "target", denoised, "denoised");
  check_rows(weight, "weight", denoised);
  return edm_loss_fwd_cuda(denoised, target, weight);
}

std::tuple<at::Tensor, at::Tensor> edm_loss_bwd(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& denoised, const at::Tensor& target, const at::Tensor& weight,
    const at::Tensor& per_sample) {
  check_batch(denoised, "denoised");
  check_like(target, "target", denoised, "denoised");
  check_rows(weight, "weight", denoised);
  check_rows(per_sample, "per_sample", denoised);
  check_grad_total(grad_total, denoised);
  if (grad_per_sample.has_value()) check_rows(*grad_per_sample, "grad_per_sample", denoised);
  return edm_loss_bwd_cuda(grad_total, grad_per_sample, denoised, target, weight, per_sample);
}

}  // namespace
}  // namespace sfd_fast

TORCH_LIBRARY(sfd_fast_C, m) {
  m.set_python_module("sfd_fast.core.cuda_ext");
  m.def("sid_loss_fwd(Tensor x_g, Tensor y_real, Tensor y_fake, Tensor weight, float alpha, "
        "float omega_min) -> (Tensor total, Tensor per_sample, Tensor omega)");
  m.def("sid_loss_bwd(Tensor grad_total, Tensor? grad_per_sample, Tensor x_g, Tensor y_real, "
        "Tensor y_fake, Tensor weight, Tensor per_sample, Tensor omega, float alpha) "
        "-> (Tensor grad_x_g, Tensor grad_y_real, Tensor grad_y_fake)");
  m.def("edm_loss_fwd(Tensor denoised, Tensor target, Tensor weight) "
        "-> (Tensor total, Tensor per_sample)");
  m.def("edm_loss_bwd(Tensor grad_total, Tensor? grad_per_sample, Tensor denoised, Tensor target, "
        "Tensor weight, Tensor per_sample) -> (Tensor grad_denoised, Tensor grad_target)");
}

TORCH_LIBRARY_IMPL(sfd_fast_C, CUDA, m) {
  m.impl("sid_loss_fwd", &sfd_fast::sid_loss_fwd);
  m.impl("sid_loss_bwd", &sfd_fast::sid_loss_bwd);
  m.impl("edm_loss_fwd", &sfd_fast::edm_loss_fwd);
  m.impl("edm_loss_bwd", &sfd_fast::edm_loss_bwd);
}

// Same functions: their first check rejects CPU tensors with a readable message.
TORCH_LIBRARY_IMPL(sfd_fast_C, CPU, m) {
  m.impl("sid_loss_fwd", &sfd_fast::sid_loss_fwd);
  m.impl("sid_loss_bwd", &sfd_fast::sid_loss_bwd);
  m.impl("edm_loss_fwd", &sfd_fast::edm_loss_fwd);
  m.impl("edm_loss_bwd", &sfd_fast::edm_loss_bwd);
}

// Importable as a Python module (setup.py builds sfd_fast._C); the ops register on import.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sfd_fast fused SiD/SFD and EDM loss kernels (ops under torch.ops.sfd_fast_C)";
}
