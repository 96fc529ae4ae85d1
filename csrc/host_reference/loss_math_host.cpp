// CPU build of the fused losses' math: the functions of ../loss_math.h (the ones the CUDA kernels
// run) driven over CPU tensors, registered as torch.ops.sfd_fast_host_ref.* with the same schemas
// and the same argument checks (../loss_checks.h) as torch.ops.sfd_fast_C.*.
//
// For tests only: it lets a CPU-only machine check the CUDA path's arithmetic, masking and skip
// decisions against the torch reference (tests/cuda_math_host.py loads it). It lives in a
// subfolder so setup.py and the CUDA JIT build (csrc/*.cpp, csrc/*.cu) never pick it up.
//
// Same layout contract as the GPU: row b is the dense block [b * N, (b + 1) * N) of every tensor,
// element i of a row is at the same flat offset in every input and gradient. Inputs fp32/bf16/fp16,
// math fp32. Row sums use kLanes strided accumulators combined pairwise, like the GPU's threads
// and tree reduction, so the fp32 summation error stays near the kernel's rather than growing
// with N as one sequential sum would.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>

#include "../loss_checks.h"
#include "../loss_buffers.h"
#include "../loss_math.h"
#include "../loss_schemas.h"

namespace sfd_fast {
namespace host_ref {
namespace {

using buffers::grad_or_empty;
using buffers::ptr_or_null;
using buffers::row_size;

using math::EdmBwd;
using math::EdmFwd;
using math::SidBwd;
using math::SidFwd;

constexpr int kLanes = 256;  // = kThreads of fused_losses.cu

#define SFD_HOST_DISPATCH_FLOATS(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// per_sample (B,), omega (B,) or nullptr, total: as row_partial_sums + finalize_rows on the GPU.
template <typename T, typename Op>
void forward_rows(const std::array<const T*, Op::kIn>& in, int64_t batch, int64_t n, const Op& op,
                  float omega_min, const float* weight, float* per_sample, float* omega, float* total) {
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      float lanes[kLanes][Op::kAcc] = {};
      for (int64_t i = 0; i < n; ++i) {
        float v[Op::kIn];
        for (int k = 0; k < Op::kIn; ++k) v[k] = static_cast<float>(in[k][row * n + i]);
        op(v, lanes[i % kLanes]);
      }
      for (int width = kLanes / 2; width > 0; width /= 2)
        for (int l = 0; l < width; ++l)
          for (int k = 0; k < Op::kAcc; ++k) lanes[l][k] += lanes[l + width][k];
      const math::RowLoss r = Op::finish(lanes[0], n, omega_min);
      per_sample[row] = r.per_sample;
      if (omega != nullptr) omega[row] = r.omega;
    }
  });
  float sum = 0.f;
  for (int64_t row = 0; row < batch; ++row) sum += math::masked_term(per_sample[row], weight[row]);
  *total = sum;
}

// out[k] == nullptr: gradient k not needed, never written. Mirrors row_grads of fused_losses.cu.
template <typename T, typename Op>
void backward_rows(const std::array<const T*, Op::kIn>& in, const std::array<T*, Op::kOut>& out,
                   int64_t batch, int64_t n, const Op& op, float grad_total, const float* grad_per,
                   const float* weight, const float* per_sample, const float* omega) {
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const float c = math::row_coefficient(per_sample[row], weight[row], grad_total,
                                            grad_per != nullptr ? grad_per[row] : 0.f);
      const bool zero = c == 0.f;
      const float s = omega != nullptr ? math::row_scale(c, omega[row]) : c;
      for (int64_t i = 0; i < n; ++i) {
        float v[Op::kIn] = {}, g[Op::kOut] = {};
        if (!zero) {
          for (int k = 0; k < Op::kIn; ++k) v[k] = static_cast<float>(in[k][row * n + i]);
          op(v, s, g);
        }
        for (int k = 0; k < Op::kOut; ++k)
          if (out[k] != nullptr) out[k][row * n + i] = static_cast<T>(g[k]);
      }
    }
  });
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_fwd(
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, double alpha, double omega_min) {
  checks::sid_fwd_args(x_g, y_real, y_fake, weight, alpha, omega_min, at::kCPU);
  const int64_t batch = x_g.size(0), n = row_size(x_g);
  const auto f32 = x_g.options().dtype(at::kFloat);
  at::Tensor total = at::empty({}, f32), per_sample = at::empty({batch}, f32), omega = at::empty({batch}, f32);
  SFD_HOST_DISPATCH_FLOATS(x_g.scalar_type(), "sid_loss_fwd", [&] {
    forward_rows<scalar_t, SidFwd>(
        {x_g.const_data_ptr<scalar_t>(), y_real.const_data_ptr<scalar_t>(), y_fake.const_data_ptr<scalar_t>()},
        batch, n, SidFwd{static_cast<float>(alpha)}, static_cast<float>(omega_min),
        weight.const_data_ptr<float>(), per_sample.data_ptr<float>(), omega.data_ptr<float>(),
        total.data_ptr<float>());
  });
  return {total, per_sample, omega};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_bwd(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, const at::Tensor& per_sample, const at::Tensor& omega, double alpha,
    bool need_x_g, bool need_y_real, bool need_y_fake) {
  checks::sid_bwd_args(grad_total, grad_per_sample, x_g, y_real, y_fake, weight, per_sample, omega,
                       alpha, at::kCPU);
  const int64_t batch = x_g.size(0), n = row_size(x_g);
  at::Tensor gx = grad_or_empty(x_g, need_x_g), gr = grad_or_empty(y_real, need_y_real),
             gf = grad_or_empty(y_fake, need_y_fake);
  SFD_HOST_DISPATCH_FLOATS(x_g.scalar_type(), "sid_loss_bwd", [&] {
    backward_rows<scalar_t, SidBwd>(
        {x_g.const_data_ptr<scalar_t>(), y_real.const_data_ptr<scalar_t>(), y_fake.const_data_ptr<scalar_t>()},
        {ptr_or_null<scalar_t>(gx), ptr_or_null<scalar_t>(gr), ptr_or_null<scalar_t>(gf)}, batch, n,
        SidBwd{static_cast<float>(alpha)}, grad_total.item<float>(),
        grad_per_sample.has_value() ? grad_per_sample->const_data_ptr<float>() : nullptr,
        weight.const_data_ptr<float>(), per_sample.const_data_ptr<float>(), omega.const_data_ptr<float>());
  });
  return {gx, gr, gf};
}

std::tuple<at::Tensor, at::Tensor> edm_loss_fwd(const at::Tensor& denoised, const at::Tensor& target,
                                                const at::Tensor& weight) {
  checks::edm_fwd_args(denoised, target, weight, at::kCPU);
  const int64_t batch = denoised.size(0), n = row_size(denoised);
  const auto f32 = denoised.options().dtype(at::kFloat);
  at::Tensor total = at::empty({}, f32), per_sample = at::empty({batch}, f32);
  SFD_HOST_DISPATCH_FLOATS(denoised.scalar_type(), "edm_loss_fwd", [&] {
    forward_rows<scalar_t, EdmFwd>({denoised.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>()},
                                   batch, n, EdmFwd{}, 0.f, weight.const_data_ptr<float>(),
                                   per_sample.data_ptr<float>(), nullptr, total.data_ptr<float>());
  });
  return {total, per_sample};
}

std::tuple<at::Tensor, at::Tensor> edm_loss_bwd(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& denoised, const at::Tensor& target, const at::Tensor& weight,
    const at::Tensor& per_sample, bool need_denoised, bool need_target) {
  checks::edm_bwd_args(grad_total, grad_per_sample, denoised, target, weight, per_sample, at::kCPU);
  const int64_t batch = denoised.size(0), n = row_size(denoised);
  at::Tensor gd = grad_or_empty(denoised, need_denoised), gt = grad_or_empty(target, need_target);
  SFD_HOST_DISPATCH_FLOATS(denoised.scalar_type(), "edm_loss_bwd", [&] {
    backward_rows<scalar_t, EdmBwd>(
        {denoised.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>()},
        {ptr_or_null<scalar_t>(gd), ptr_or_null<scalar_t>(gt)}, batch, n, EdmBwd{},
        grad_total.item<float>(),
        grad_per_sample.has_value() ? grad_per_sample->const_data_ptr<float>() : nullptr,
        weight.const_data_ptr<float>(), per_sample.const_data_ptr<float>(), nullptr);
  });
  return {gd, gt};
}

}  // namespace
}  // namespace host_ref
}  // namespace sfd_fast

// The schemas of sfd_fast_C (loss_schemas.h), so a test can swap one namespace for the other.
TORCH_LIBRARY(sfd_fast_host_ref, m) {
  m.def(sfd_fast::schemas::kSidLossFwd);
  m.def(sfd_fast::schemas::kSidLossBwd);
  m.def(sfd_fast::schemas::kEdmLossFwd);
  m.def(sfd_fast::schemas::kEdmLossBwd);
}

TORCH_LIBRARY_IMPL(sfd_fast_host_ref, CPU, m) {
  m.impl("sid_loss_fwd", &sfd_fast::host_ref::sid_loss_fwd);
  m.impl("sid_loss_bwd", &sfd_fast::host_ref::sid_loss_bwd);
  m.impl("edm_loss_fwd", &sfd_fast::host_ref::edm_loss_fwd);
  m.impl("edm_loss_bwd", &sfd_fast::host_ref::edm_loss_bwd);
}
