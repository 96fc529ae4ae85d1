// Output buffers of the fused-loss ops, shared by the CUDA ops (fused_losses.cu) and the CPU
// reference build (host_reference/): both allocate, and skip, gradients the same way.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>

namespace sfd_fast {
namespace buffers {

// N, the elements of one sample (row) of a (B, ...) batch.
inline int64_t row_size(const at::Tensor& t) { return t.numel() / t.size(0); }

// The gradient of `like` with its strides (empty_like preserves a dense layout), or an empty
// (0,) tensor when it is not needed.
inline at::Tensor grad_or_empty(const at::Tensor& like, bool need) {
  return need ? at::empty_like(like) : at::empty({0}, like.options());
}

// The kernels' write pointer: null for a gradient nobody asked for, so it is never written.
template <typename T>
T* ptr_or_null(at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

}  // namespace buffers
}  // namespace sfd_fast
