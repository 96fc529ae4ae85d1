// Argument checks and operator registration of the fused losses (namespace sfd_fast_C).
//
// Every op is registered with TORCH_LIBRARY so torch.compile and CUDA graphs see one opaque op;
// sfd_fast/core/cuda_ext.py adds the fake (shape) functions and the autograd formula from Python
// (hence set_python_module). The checks live in loss_checks.h, shared with the CPU reference build
// (host_reference/), so both reject the same inputs with the same messages. The same checked
// functions are registered for CPU so a CPU tensor gets "must be a CUDA tensor" instead of the
// dispatcher's "could not run" error. The schemas, with the backward's need flags, are in
// loss_schemas.h.

#include <torch/extension.h>

#include "fused_losses.h"
#include "loss_checks.h"
#include "loss_schemas.h"

namespace sfd_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_fwd(
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, double alpha, double omega_min) {
  checks::sid_fwd_args(x_g, y_real, y_fake, weight, alpha, omega_min, at::kCUDA);
  return sid_loss_fwd_cuda(x_g, y_real, y_fake, weight, alpha, omega_min);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_bwd(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, const at::Tensor& per_sample, const at::Tensor& omega, double alpha,
    bool need_x_g, bool need_y_real, bool need_y_fake) {
  checks::sid_bwd_args(grad_total, grad_per_sample, x_g, y_real, y_fake, weight, per_sample, omega,
                       alpha, at::kCUDA);
  return sid_loss_bwd_cuda(grad_total, grad_per_sample, x_g, y_real, y_fake, weight, per_sample,
                           omega, alpha, {need_x_g, need_y_real, need_y_fake});
}

std::tuple<at::Tensor, at::Tensor> edm_loss_fwd(const at::Tensor& denoised, const at::Tensor& target,
                                                const at::Tensor& weight) {
  checks::edm_fwd_args(denoised, target, weight, at::kCUDA);
  return edm_loss_fwd_cuda(denoised, target, weight);
}

std::tuple<at::Tensor, at::Tensor> edm_loss_bwd(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& denoised, const at::Tensor& target, const at::Tensor& weight,
    const at::Tensor& per_sample, bool need_denoised, bool need_target) {
  checks::edm_bwd_args(grad_total, grad_per_sample, denoised, target, weight, per_sample, at::kCUDA);
  return edm_loss_bwd_cuda(grad_total, grad_per_sample, denoised, target, weight, per_sample,
                           {need_denoised, need_target});
}

}  // namespace
}  // namespace sfd_fast

TORCH_LIBRARY(sfd_fast_C, m) {
  m.set_python_module("sfd_fast.core.cuda_ext");
  m.def(sfd_fast::schemas::kSidLossFwd);
  m.def(sfd_fast::schemas::kSidLossBwd);
  m.def(sfd_fast::schemas::kEdmLossFwd);
  m.def(sfd_fast::schemas::kEdmLossBwd);
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
