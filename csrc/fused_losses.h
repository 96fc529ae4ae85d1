// Launchers of the fused SiD/SFD and EDM loss kernels (fused_losses.cu).
//
// Inputs are validated by bindings.cpp before these run: CUDA, same device, same dtype in
// {fp32, bf16, fp16}, contiguous, shape (B, ...) with B >= 1 and at least one element per row;
// weight fp32 (B,). All arithmetic accumulates in fp32. Outputs:
//   forward  -> total (0-d fp32), per_sample (B,) fp32, omega (B,) fp32 (SiD only; saved for bwd)
//   backward -> one gradient per image input, in the inputs' dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

namespace sfd_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_fwd_cuda(
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, double alpha, double omega_min);

std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_bwd_cuda(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, const at::Tensor& per_sample, const at::Tensor& omega, double alpha);

std::tuple<at::Tensor, at::Tensor> edm_loss_fwd_cuda(
    const at::Tensor& denoised, const at::Tensor& target, const at::Tensor& weight);

std::tuple<at::Tensor, at::Tensor> edm_loss_bwd_cuda(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& denoised, const at::Tensor& target, const at::Tensor& weight,
    const at::Tensor& per_sample);

}  // namespace sfd_fast
