// Operator schemas of the fused losses, one definition for the CUDA ops (torch.ops.sfd_fast_C,
// bindings.cpp) and the CPU reference build (torch.ops.sfd_fast_host_ref, host_reference/), so a
// test can swap one namespace for the other.
//
// Backward need flags: a gradient whose flag is false comes back as an empty (0,) tensor and is
// never written (the fake-score step needs dD alone: EDM's backward then moves 3 tensors, not 4).
#pragma once

namespace sfd_fast {
namespace schemas {

constexpr const char* kSidLossFwd =
    "sid_loss_fwd(Tensor x_g, Tensor y_real, Tensor y_fake, Tensor weight, float alpha, "
    "float omega_min) -> (Tensor total, Tensor per_sample, Tensor omega)";
constexpr const char* kSidLossBwd =
    "sid_loss_bwd(Tensor grad_total, Tensor? grad_per_sample, Tensor x_g, Tensor y_real, "
    "Tensor y_fake, Tensor weight, Tensor per_sample, Tensor omega, float alpha, "
    "bool need_x_g, bool need_y_real, bool need_y_fake) "
    "-> (Tensor grad_x_g, Tensor grad_y_real, Tensor grad_y_fake)";
constexpr const char* kEdmLossFwd =
    "edm_loss_fwd(Tensor denoised, Tensor target, Tensor weight) -> (Tensor total, Tensor per_sample)";
constexpr const char* kEdmLossBwd =
    "edm_loss_bwd(Tensor grad_total, Tensor? grad_per_sample, Tensor denoised, Tensor target, "
    "Tensor weight, Tensor per_sample, bool need_denoised, bool need_target) "
    "-> (Tensor grad_denoised, Tensor grad_target)";

}  // namespace schemas
}  // namespace sfd_fast
