// The arithmetic of the fused losses, shared by the CUDA kernels (fused_losses.cu) and the CPU
// reference build (host_reference/loss_math_host.cpp), so both run the very same code.
//
// Plain functions of fp32 scalars, no memory access: per element, per row, per row coefficient.
// Results are not bitwise equal across the two builds, only close: nvcc contracts a*b+c into FMA
// and the GPU sums in another order, both within fp32 rounding.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define SFD_HD __host__ __device__ __forceinline__
#else
#define SFD_HD inline
#endif

namespace sfd_fast {
namespace math {

// False for NaN and +-inf. fabsf + compare, not isfinite: the same on host and device, and the
// same test the Triton kernels use, so every backend takes the same skip decision.
SFD_HD bool is_finite(float x) { return fabsf(x) <= FLT_MAX; }

// Per sample: the finished row of a forward pass. omega is 1 for EDM.
struct RowLoss {
  float per_sample;
  float omega;
};

// ---- per element: forward accumulators -------------------------------------------------------
// v = the inputs' values at one element, in argument order; acc = the row's running sums.

struct SidFwd {
  static constexpr int kIn = 3, kAcc = 2;  // v = (x_g, y_r, y_f); acc = (sum|e|, sum d(e - alpha d))
  float alpha;
  SFD_HD void operator()(const float (&v)[kIn], float (&acc)[kAcc]) const {
    const float e = v[1] - v[0], d = v[1] - v[2];
    acc[0] += fabsf(e);
    acc[1] += d * (e - alpha * d);
  }
  // omega = max(mean|e|, omega_min) with NaN kept, like torch.clamp_min (fmaxf would drop it, and
  // a NaN row would then look finite); L = sum / omega.
  static SFD_HD RowLoss finish(const float (&acc)[kAcc], int64_t n, float omega_min) {
    const float mean_abs = acc[0] / static_cast<float>(n);
    const float omega = mean_abs < omega_min ? omega_min : mean_abs;
    return {acc[1] / omega, omega};
  }
};

struct EdmFwd {
  static constexpr int kIn = 2, kAcc = 1;  // v = (D, x); acc = (sum (D - x)^2)
  SFD_HD void operator()(const float (&v)[kIn], float (&acc)[kAcc]) const {
    const float r = v[0] - v[1];
    acc[0] += r * r;
  }
  static SFD_HD RowLoss finish(const float (&acc)[kAcc], int64_t /*n*/, float /*omega_min*/) {
    return {acc[0], 1.f};
  }
};

// What a row adds to total = sum over finite rows of weight * per_sample.
SFD_HD float masked_term(float per_sample, float weight) {
  return is_finite(per_sample) ? weight * per_sample : 0.f;
}

// ---- per row: backward coefficient -------------------------------------------------------------

// dLoss/dper_sample of a row: g_total * w + g_per_sample where the row's loss is finite, and
// exactly 0 on masked rows, grad_per_sample included (the reference's masked per_sample has no
// gradient path either). A row with coefficient 0 is written as zeros without being read.
SFD_HD float row_coefficient(float per_sample, float weight, float grad_total, float grad_per) {
  return is_finite(per_sample) ? grad_total * weight + grad_per : 0.f;
}

// s = c / omega, the factor of the per-element gradient formulas. The mask comes first: a masked
// NaN row has omega = NaN, and 0 / NaN would be NaN.
SFD_HD float row_scale(float coef, float omega) { return coef == 0.f ? 0.f : coef / omega; }

// ---- per element: backward -----------------------------------------------------------------------
// g[k] = dLoss/dv[k] at one element, given the row's s.

struct SidBwd {
  static constexpr int kIn = 3, kOut = 3;
  float alpha;
  // dx_g = -s d, dy_r = s (e + (1 - 2 alpha) d), dy_f = s (2 alpha d - e)
  SFD_HD void operator()(const float (&v)[kIn], float s, float (&g)[kOut]) const {
    const float e = v[1] - v[0], d = v[1] - v[2];
    g[0] = -s * d;
    g[1] = s * (e + (1.f - 2.f * alpha) * d);
    g[2] = s * (2.f * alpha * d - e);
  }
};

struct EdmBwd {
  static constexpr int kIn = 2, kOut = 2;
  // dD = 2 s (D - x), dx = -dD
  SFD_HD void operator()(const float (&v)[kIn], float s, float (&g)[kOut]) const {
    const float r = 2.f * s * (v[0] - v[1]);
    g[0] = r;
    g[1] = -r;
  }
};

}  // namespace math
}  // namespace sfd_fast
