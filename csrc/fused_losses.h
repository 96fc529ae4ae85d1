// Launchers of the fused SiD/SFD and EDM loss kernels (fused_losses.cu).
//
// Inputs are validated by bindings.cpp (loss_checks.h) before these run: CUDA, same device, same
// dtype in {fp32, bf16, fp16}, shape (B, ...) with B >= 1 and at least one element per row, each
// row one dense block at offset b * numel/B with the same strides in every image input
// (contiguous or channels_last); weight fp32 (B,). All arithmetic accumulates in fp32. Outputs:
//   forward  -> total (0-d fp32), per_sample (B,) fp32, omega (B,) fp32 (SiD only; saved for bwd)
//   backward -> one gradient per image input, in the inputs' dtype and strides; where `need`
//               is false an empty (0,) tensor instead, and nothing is written.
#pragma once

#include <ATen/core/Tensor.h>
#include <array>
#include <optional>
#include <tuple>

namespace sfd_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_fwd_cuda(
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, double alpha, double omega_min);

// need = (x_g, y_real, y_fake)
std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_bwd_cuda(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, const at::Tensor& per_sample, const at::Tensor& omega, double alpha,
    std::array<bool, 3> need);

std::tuple<at::Tensor, at::Tensor> edm_loss_fwd_cuda(
    const at::Tensor& denoised, const at::Tensor& target, const at::Tensor& weight);

// need = (denoised, target)
std::tuple<at::Tensor, at::Tensor> edm_loss_bwd_cuda(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& denoised, const at::Tensor& target, const at::Tensor& weight,
    const at::Tensor& per_sample, std::array<bool, 2> need);

}  // namespace sfd_fast
