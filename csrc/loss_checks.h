// Argument checks of the fused-loss ops, shared by the CUDA ops (bindings.cpp, device kCUDA) and
// the CPU reference build (host_reference/, device kCPU): both accept and reject the same inputs
// with the same messages. Each check names the tensor, what it got and what is allowed.
//
// Layout rule: the kernels address sample b's element k at data_ptr + b * N + k (N = numel / B).
// That holds for any tensor whose samples are each one gap-free block in order (contiguous NCHW,
// channels_last NHWC, ...), and element k is the same pixel in every input when all share their
// strides. Gradients are allocated with empty_like, which keeps those strides.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace sfd_fast {
namespace checks {

inline bool is_float_kind(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Non-overlapping and dense, batch dim outermost: sample b is the block [b * N, (b + 1) * N).
inline bool rows_are_dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && (t.size(0) == 1 || t.stride(0) == t.numel() / t.size(0));
}

// Same strides wherever a dim has more than one element (a size-1 dim's stride is arbitrary).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

constexpr const char* kLayoutFix =
    "call .contiguous() or .contiguous(memory_format=torch.channels_last) on all inputs";

// An image batch (B, ...): on `device`, fp32/bf16/fp16, B >= 1, >= 1 element per sample, rows dense.
inline void check_batch(const at::Tensor& t, const char* name, at::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got device ", t.device());
  TORCH_CHECK(is_float_kind(t.scalar_type()), name, " has dtype ", t.scalar_type(),
              "; allowed: Float (fp32), BFloat16, Half (fp16)");
  TORCH_CHECK(t.dim() >= 2, name, " must have shape (B, ...) with at least 2 dims, got shape ",
              t.sizes());
  TORCH_CHECK(t.size(0) >= 1, name, " is an empty batch (shape ", t.sizes(),
              "); the batch size B must be >= 1");
  TORCH_CHECK(t.numel() > 0, name, " has no elements per sample (shape ", t.sizes(),
              "); every sample needs at least one element");
  TORCH_CHECK(rows_are_dense(t), name, " (shape ", t.sizes(), ", strides ", t.strides(),
              ") does not store each sample as one dense block; allowed: contiguous or "
              "channels_last layouts (", kLayoutFix, ")");
}

// `t` must match the first image input `ref` in device, dtype, shape and memory layout.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_batch(t, name, ref.device().type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all inputs must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type(), "; all image inputs must share one dtype");
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " has shape ", t.sizes(), " but ", ref_name,
              " has ", ref.sizes(), "; they must be equal");
  TORCH_CHECK(same_layout(t, ref), name, " has strides ", t.strides(), " but ", ref_name, " has ",
              ref.strides(), "; all image inputs must share one memory layout (", kLayoutFix, ")");
}

// A per-sample fp32 vector of shape (B,) on ref's device.
inline void check_rows(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the images are on ",
              ref.device(), "; all inputs must be on one device");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " has dtype ", t.scalar_type(),
              "; it must be Float (fp32)");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(0), name, " must have shape (B,) = (",
              ref.size(0), ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

inline void check_grad_total(const at::Tensor& g, const at::Tensor& ref) {
  TORCH_CHECK(g.device() == ref.device(), "grad_total is on ", g.device(),
              " but the images are on ", ref.device());
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.numel() == 1,
              "grad_total must be a one-element Float tensor, got dtype ", g.scalar_type(),
              " and shape ", g.sizes());
}

inline void check_finite(double v, const char* name) {
  TORCH_CHECK(std::isfinite(v), name, " must be a finite number, got ", v);
}

// ---- the argument lists of the four ops ------------------------------------------------------

inline void sid_fwd_args(const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
                         const at::Tensor& weight, double alpha, double omega_min,
                         at::DeviceType device) {
  check_batch(x_g, "x_g", device);
  check_like(y_real, "y_real", x_g, "x_g");
  check_like(y_fake, "y_fake", x_g, "x_g");
  check_rows(weight, "weight", x_g);
  check_finite(alpha, "alpha");
  check_finite(omega_min, "omega_min");
}

inline void sid_bwd_args(const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
                         const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
                         const at::Tensor& weight, const at::Tensor& per_sample,
                         const at::Tensor& omega, double alpha, at::DeviceType device) {
  check_batch(x_g, "x_g", device);
  check_like(y_real, "y_real", x_g, "x_g");
  check_like(y_fake, "y_fake", x_g, "x_g");
  check_rows(weight, "weight", x_g);
  check_rows(per_sample, "per_sample", x_g);
  check_rows(omega, "omega", x_g);
  check_grad_total(grad_total, x_g);
  if (grad_per_sample.has_value()) check_rows(*grad_per_sample, "grad_per_sample", x_g);
  check_finite(alpha, "alpha");
}

inline void edm_fwd_args(const at::Tensor& denoised, const at::Tensor& target,
                         const at::Tensor& weight, at::DeviceType device) {
  check_batch(denoised, "denoised", device);
  check_like(target, "target", denoised, "denoised");
  check_rows(weight, "weight", denoised);
}

inline void edm_bwd_args(const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
                         const at::Tensor& denoised, const at::Tensor& target,
                         const at::Tensor& weight, const at::Tensor& per_sample,
                         at::DeviceType device) {
  check_batch(denoised, "denoised", device);
  check_like(target, "target", denoised, "denoised");
  check_rows(weight, "weight", denoised);
  check_rows(per_sample, "per_sample", denoised);
  check_grad_total(grad_total, denoised);
  if (grad_per_sample.has_value()) check_rows(*grad_per_sample, "grad_per_sample", denoised);
}

}  // namespace checks
}  // namespace sfd_fast
