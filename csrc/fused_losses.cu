// Fused SiD/SFD generator loss and EDM denoising loss, forward and backward.
//
// Math (fp32 accumulation whatever the input dtype), per sample row i of N elements; the
// formulas themselves live in loss_math.h, shared with the CPU reference build:
//   SiD: d = y_r - y_f, e = y_r - x_g, omega_i = max(mean|e|, omega_min),
//        L_i = sum(d * (e - alpha d)) / omega_i.  Since omega_i is a per-row constant, both
//        sums come out of ONE read of the three inputs.
//   EDM: L_i = sum (D - x)^2.
//   total = sum over finite L_i of weight_i * L_i.
// Backward: row coefficient c_i = (L_i finite ? g_total * weight_i + g_per_sample_i : 0), then
//   SiD: dx_g = -c d / omega, dy_r = c (e + (1 - 2 alpha) d) / omega, dy_f = c (2 alpha d - e) / omega
//   EDM: dD = 2 c (D - x), dx = -dD.  A row with c_i == 0 (masked non-finite rows) gets exact
//   zeros without reading its inputs, so NaN rows never leak into the gradients. A gradient
//   that is not needed (null output pointer, uniform per launch) is never written.
// Pass count: forward = 1 read of every input (+ a tiny (B x splits) finalisation);
//   backward = 1 read of every input + 1 write of every needed gradient. That is the minimum:
//   the backward needs omega_i, which depends on the whole row, so it cannot share the forward.
// Layout: row i is the dense block [i*N, (i+1)*N) of every tensor (contiguous or channels_last:
//   row sums ignore element order, and the gradients share the inputs' strides). Grid (B, splits);
//   a row is split over `splits` blocks when B alone cannot fill the GPU; each block reduces with
//   warp shuffles, the partials are summed in a fixed order (deterministic, no atomics). Loads
//   and stores are 16-byte vectors when every tensor has the same alignment mod 16, with a
//   scalar head/tail per row; otherwise a scalar path.

#include "fused_losses.h"
#include "loss_buffers.h"
#include "loss_math.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace sfd_fast {
namespace {

using buffers::grad_or_empty;
using buffers::ptr_or_null;
using buffers::row_size;

using math::EdmBwd;
using math::EdmFwd;
using math::SidBwd;
using math::SidFwd;

// fp32, fp16 and bf16 only (AT_DISPATCH_FLOATING_TYPES would also instantiate double, which
// bindings.cpp rejects: a quarter more compile time for nothing).
#define SFD_DISPATCH_FLOATS(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// 16 bytes of T held as one uint4, so a vector is one ld.global.nc.v4.u32 and one
// st.global.v4.b32. A struct of T[16 / sizeof(T)] (the first version) was stored piecewise: per
// 16-byte vector 2 x u16 + 3 x v2.u16 for bf16/fp16, f32 + f32 + v2.f32 for fp32 (nvcc 13.0,
// sm_90 PTX; tests/test_cuda_ext.py::test_row_grads_stores_are_128_bit counts them).
template <typename T>
struct Vec16 {
  static_assert(sizeof(T) == 4 || sizeof(T) == 2, "fp32, fp16 or bf16");
  static constexpr int kLen = 16 / sizeof(T);
  uint4 raw;

  // Inputs are never written by the kernel that reads them: the read-only path is safe.
  __device__ __forceinline__ static Vec16 load(const T* p) {
    return {__ldg(reinterpret_cast<const uint4*>(p))};
  }
  // Inline PTX: a plain uint4 assignment still came out as u32 + u32 + v2.u32 per vector for
  // fp32 (nvcc 13.0, sm_90), though bf16/fp16 got one v4 store.
  __device__ __forceinline__ void store(T* p) const {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(raw.x), "r"(raw.y),
                 "r"(raw.z), "r"(raw.w)
                 : "memory");
  }

  __device__ __forceinline__ void unpack(float (&f)[kLen]) const {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < kLen; ++j) {
      if constexpr (sizeof(T) == 4) {
        f[j] = __uint_as_float(w[j]);
      } else {  // element j is the low (even j) or high half of word j / 2
        const auto bits = static_cast<unsigned short>(w[j / 2] >> (16 * (j % 2)));
        f[j] = static_cast<float>(T(bits, T::from_bits()));
      }
    }
  }
  __device__ __forceinline__ static Vec16 pack(const float (&f)[kLen]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (sizeof(T) == 4)
        w[i] = __float_as_uint(f[i]);
      else  // round each float to T once (RNE), then place the two halves
        w[i] = static_cast<uint32_t>(T(f[2 * i]).x) | (static_cast<uint32_t>(T(f[2 * i + 1]).x) << 16);
    }
    return {make_uint4(w[0], w[1], w[2], w[3])};
  }
};

template <typename T, int K>
struct Ptrs {
  T* p[K];
};

// Sum of each of the K accumulators over the block; the result is valid in thread 0.
template <int K>
__device__ __forceinline__ void block_sum(float (&acc)[K]) {
  __shared__ float smem[K][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], off);
    if (lane == 0) smem[k][warp] = acc[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc[k] = lane < kWarps ? smem[k][lane] : 0.f;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], off);
    }
  }
}

// Visits the elements of one row that belong to this block: fv(offset) for 16-byte-aligned
// vectors of 16/sizeof(T) elements, fs(offset) for single elements (head before the first
// aligned address and tail after the last full vector; fewer than 2 vectors' worth per row).
template <typename T, bool kVec, typename Scalar, typename Vector>
__device__ __forceinline__ void for_row(const void* row_start, int64_t n, Scalar fs, Vector fv) {
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t stride = splits * blockDim.x;
  if constexpr (kVec) {
    constexpr int64_t V = Vec16<T>::kLen;
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row_start) & 15) / sizeof(T);
    const int64_t head = std::min<int64_t>(n, mis ? V - mis : 0);
    const int64_t nvec = (n - head) / V;
    for (int64_t j = split * blockDim.x + threadIdx.x; j < nvec; j += stride) fv(head + j * V);
    if (split == splits - 1) {
      const int64_t t = threadIdx.x;  // blockDim.x >= V, so one element per thread suffices
      if (t < head) fs(t);
      if (head + nvec * V + t < n) fs(head + nvec * V + t);
    }
  } else {
    for (int64_t j = split * blockDim.x + threadIdx.x; j < n; j += stride) fs(j);
  }
}

// ---- kernels -------------------------------------------------------------------------------

// partial[(row * splits + split) * kAcc + k]: this block's share of the row's sums.
template <typename T, typename Op, bool kVec>
__global__ void __launch_bounds__(kThreads)
row_partial_sums(Ptrs<const T, Op::kIn> in, int64_t n, Op op, float* __restrict__ partial) {
  const int64_t row = blockIdx.x;
  float acc[Op::kAcc];
#pragma unroll
  for (int k = 0; k < Op::kAcc; ++k) acc[k] = 0.f;
  auto scalar = [&](int64_t i) {
    float v[Op::kIn];
#pragma unroll
    for (int k = 0; k < Op::kIn; ++k) v[k] = static_cast<float>(in.p[k][row * n + i]);
    op(v, acc);
  };
  auto vector = [&](int64_t i) {
    constexpr int V = Vec16<T>::kLen;
    float vals[Op::kIn][V];
#pragma unroll
    for (int k = 0; k < Op::kIn; ++k) Vec16<T>::load(in.p[k] + row * n + i).unpack(vals[k]);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float v[Op::kIn];
#pragma unroll
      for (int k = 0; k < Op::kIn; ++k) v[k] = vals[k][j];
      op(v, acc);
    }
  };
  for_row<T, kVec>(in.p[0] + row * n, n, scalar, vector);
  block_sum<Op::kAcc>(acc);
  if (threadIdx.x == 0) {
    float* out = partial + (row * gridDim.y + blockIdx.y) * Op::kAcc;
#pragma unroll
    for (int k = 0; k < Op::kAcc; ++k) out[k] = acc[k];
  }
}

// One block: per-row results from the partials (fixed summation order), then the masked total.
// omega may be nullptr (EDM: nothing to save for the backward).
template <typename Op>
__global__ void __launch_bounds__(kThreads)
finalize_rows(const float* __restrict__ partial, int64_t splits, int64_t batch, int64_t n,
              const float* __restrict__ weight, float omega_min, float* __restrict__ per_sample,
              float* __restrict__ omega, float* __restrict__ total) {
  constexpr int K = Op::kAcc;
  float contrib[1] = {0.f};
  for (int64_t row = threadIdx.x; row < batch; row += blockDim.x) {
    float sums[K] = {};
    for (int64_t s = 0; s < splits; ++s)
#pragma unroll
      for (int k = 0; k < K; ++k) sums[k] += partial[(row * splits + s) * K + k];
    const math::RowLoss r = Op::finish(sums, n, omega_min);
    per_sample[row] = r.per_sample;
    if (omega != nullptr) omega[row] = r.omega;
    contrib[0] += math::masked_term(r.per_sample, weight[row]);
  }
  block_sum<1>(contrib);
  if (threadIdx.x == 0) *total = contrib[0];
}

struct RowCoef {
  const float* grad_total;  // 0-d
  const float* grad_per;    // (B,) or nullptr
  const float* weight;      // (B,)
  const float* per_sample;  // (B,)
  const float* omega;       // (B,) or nullptr (EDM)
};

// out.p[k] == nullptr: gradient k is not needed and never written (uniform over the launch).
template <typename T, typename Op, bool kVec>
__global__ void __launch_bounds__(kThreads)
row_grads(Ptrs<const T, Op::kIn> in, Ptrs<T, Op::kOut> out, int64_t n, Op op, RowCoef rc) {
  const int64_t row = blockIdx.x;
  const float c = math::row_coefficient(rc.per_sample[row], rc.weight[row], *rc.grad_total,
                                        rc.grad_per != nullptr ? rc.grad_per[row] : 0.f);
  const bool zero = c == 0.f;  // uniform over the block: masked rows are written, never read
  const float s = rc.omega != nullptr ? math::row_scale(c, rc.omega[row]) : c;
  auto scalar = [&](int64_t i) {
    float v[Op::kIn] = {}, g[Op::kOut] = {};
    if (!zero) {
#pragma unroll
      for (int k = 0; k < Op::kIn; ++k) v[k] = static_cast<float>(in.p[k][row * n + i]);
      op(v, s, g);
    }
#pragma unroll
    for (int k = 0; k < Op::kOut; ++k)
      if (out.p[k] != nullptr) out.p[k][row * n + i] = static_cast<T>(g[k]);
  };
  auto vector = [&](int64_t i) {
    constexpr int V = Vec16<T>::kLen;
    float g[Op::kOut][V] = {};
    if (!zero) {
      float vals[Op::kIn][V];
#pragma unroll
      for (int k = 0; k < Op::kIn; ++k) Vec16<T>::load(in.p[k] + row * n + i).unpack(vals[k]);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float v[Op::kIn], gj[Op::kOut];
#pragma unroll
        for (int k = 0; k < Op::kIn; ++k) v[k] = vals[k][j];
        op(v, s, gj);
#pragma unroll
        for (int k = 0; k < Op::kOut; ++k) g[k][j] = gj[k];
      }
    }
#pragma unroll
    for (int k = 0; k < Op::kOut; ++k)
      if (out.p[k] != nullptr) Vec16<T>::pack(g[k]).store(out.p[k] + row * n + i);
  };
  for_row<T, kVec>(in.p[0] + row * n, n, scalar, vector);
}

// ---- host side -------------------------------------------------------------------------------

// Blocks per row: enough blocks in all (~4 per SM) to hide memory latency, but at least
// 2 * kThreads work items per block so the partial buffer stays tiny.
int64_t choose_splits(int64_t batch, int64_t work_items) {
  // cudaDeviceGetAttribute rather than ATen's device-properties helper: its header pulls in
  // cuBLAS/cuSPARSE, which a compile-only toolkit may lack. The attribute query is cheap.
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t want = (4 * static_cast<int64_t>(sms) + batch - 1) / batch;
  const int64_t useful = (work_items + 2 * kThreads - 1) / (2 * kThreads);
  return std::clamp<int64_t>(std::min(want, useful), 1, 65535);
}

// Vector loads are valid when every tensor's data has the same offset mod 16: rows then share
// their misalignment, and the head/tail split of for_row is the same for all tensors. Tensors
// without storage (gradients not needed) are skipped.
bool same_alignment(std::initializer_list<const at::Tensor*> ts) {
  const uintptr_t a = reinterpret_cast<uintptr_t>((*ts.begin())->data_ptr()) & 15;
  for (const at::Tensor* t : ts)
    if (t->numel() > 0 && (reinterpret_cast<uintptr_t>(t->data_ptr()) & 15) != a) return false;
  return true;
}


}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_fwd_cuda(
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, double alpha, double omega_min) {
  const c10::cuda::CUDAGuard guard(x_g.device());
  const int64_t batch = x_g.size(0), n = row_size(x_g);
  const auto f32 = x_g.options().dtype(at::kFloat);
  const bool vec = same_alignment({&x_g, &y_real, &y_fake});
  const int64_t splits = choose_splits(batch, vec ? n / (16 / x_g.element_size()) : n);
  at::Tensor partial = at::empty({batch, splits, 2}, f32);
  at::Tensor total = at::empty({}, f32), per_sample = at::empty({batch}, f32), omega = at::empty({batch}, f32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(splits));
  SFD_DISPATCH_FLOATS(x_g.scalar_type(), "sid_loss_fwd", [&] {
    const Ptrs<const scalar_t, 3> in{{x_g.const_data_ptr<scalar_t>(), y_real.const_data_ptr<scalar_t>(),
                                      y_fake.const_data_ptr<scalar_t>()}};
    const SidFwd op{static_cast<float>(alpha)};
    if (vec)
      row_partial_sums<scalar_t, SidFwd, true><<<grid, kThreads, 0, stream>>>(in, n, op, partial.data_ptr<float>());
    else
      row_partial_sums<scalar_t, SidFwd, false><<<grid, kThreads, 0, stream>>>(in, n, op, partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finalize_rows<SidFwd><<<1, kThreads, 0, stream>>>(
      partial.const_data_ptr<float>(), splits, batch, n, weight.const_data_ptr<float>(),
      static_cast<float>(omega_min), per_sample.data_ptr<float>(), omega.data_ptr<float>(), total.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {total, per_sample, omega};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sid_loss_bwd_cuda(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& x_g, const at::Tensor& y_real, const at::Tensor& y_fake,
    const at::Tensor& weight, const at::Tensor& per_sample, const at::Tensor& omega, double alpha,
    std::array<bool, 3> need) {
  const c10::cuda::CUDAGuard guard(x_g.device());
  const int64_t batch = x_g.size(0), n = row_size(x_g);
  at::Tensor gx = grad_or_empty(x_g, need[0]), gr = grad_or_empty(y_real, need[1]),
             gf = grad_or_empty(y_fake, need[2]);
  if (!need[0] && !need[1] && !need[2]) return {gx, gr, gf};
  const bool vec = same_alignment({&x_g, &y_real, &y_fake, &gx, &gr, &gf});
  const int64_t splits = choose_splits(batch, vec ? n / (16 / x_g.element_size()) : n);
  const RowCoef rc{grad_total.const_data_ptr<float>(),
                   grad_per_sample.has_value() ? grad_per_sample->const_data_ptr<float>() : nullptr,
                   weight.const_data_ptr<float>(), per_sample.const_data_ptr<float>(),
                   omega.const_data_ptr<float>()};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(splits));
  SFD_DISPATCH_FLOATS(x_g.scalar_type(), "sid_loss_bwd", [&] {
    const Ptrs<const scalar_t, 3> in{{x_g.const_data_ptr<scalar_t>(), y_real.const_data_ptr<scalar_t>(),
                                      y_fake.const_data_ptr<scalar_t>()}};
    const Ptrs<scalar_t, 3> out{{ptr_or_null<scalar_t>(gx), ptr_or_null<scalar_t>(gr), ptr_or_null<scalar_t>(gf)}};
    const SidBwd op{static_cast<float>(alpha)};
    if (vec)
      row_grads<scalar_t, SidBwd, true><<<grid, kThreads, 0, stream>>>(in, out, n, op, rc);
    else
      row_grads<scalar_t, SidBwd, false><<<grid, kThreads, 0, stream>>>(in, out, n, op, rc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gr, gf};
}

std::tuple<at::Tensor, at::Tensor> edm_loss_fwd_cuda(
    const at::Tensor& denoised, const at::Tensor& target, const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(denoised.device());
  const int64_t batch = denoised.size(0), n = row_size(denoised);
  const auto f32 = denoised.options().dtype(at::kFloat);
  const bool vec = same_alignment({&denoised, &target});
  const int64_t splits = choose_splits(batch, vec ? n / (16 / denoised.element_size()) : n);
  at::Tensor partial = at::empty({batch, splits, 1}, f32);
  at::Tensor total = at::empty({}, f32), per_sample = at::empty({batch}, f32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(splits));
  SFD_DISPATCH_FLOATS(denoised.scalar_type(), "edm_loss_fwd", [&] {
    const Ptrs<const scalar_t, 2> in{{denoised.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>()}};
    if (vec)
      row_partial_sums<scalar_t, EdmFwd, true><<<grid, kThreads, 0, stream>>>(in, n, EdmFwd{}, partial.data_ptr<float>());
    else
      row_partial_sums<scalar_t, EdmFwd, false><<<grid, kThreads, 0, stream>>>(in, n, EdmFwd{}, partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finalize_rows<EdmFwd><<<1, kThreads, 0, stream>>>(
      partial.const_data_ptr<float>(), splits, batch, n, weight.const_data_ptr<float>(), 0.f,
      per_sample.data_ptr<float>(), nullptr, total.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {total, per_sample};
}

std::tuple<at::Tensor, at::Tensor> edm_loss_bwd_cuda(
    const at::Tensor& grad_total, const std::optional<at::Tensor>& grad_per_sample,
    const at::Tensor& denoised, const at::Tensor& target, const at::Tensor& weight,
    const at::Tensor& per_sample, std::array<bool, 2> need) {
  const c10::cuda::CUDAGuard guard(denoised.device());
  const int64_t batch = denoised.size(0), n = row_size(denoised);
  at::Tensor gd = grad_or_empty(denoised, need[0]), gt = grad_or_empty(target, need[1]);
  if (!need[0] && !need[1]) return {gd, gt};
  const bool vec = same_alignment({&denoised, &target, &gd, &gt});
  const int64_t splits = choose_splits(batch, vec ? n / (16 / denoised.element_size()) : n);
  const RowCoef rc{grad_total.const_data_ptr<float>(),
                   grad_per_sample.has_value() ? grad_per_sample->const_data_ptr<float>() : nullptr,
                   weight.const_data_ptr<float>(), per_sample.const_data_ptr<float>(), nullptr};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(splits));
  SFD_DISPATCH_FLOATS(denoised.scalar_type(), "edm_loss_bwd", [&] {
    const Ptrs<const scalar_t, 2> in{{denoised.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>()}};
    const Ptrs<scalar_t, 2> out{{ptr_or_null<scalar_t>(gd), ptr_or_null<scalar_t>(gt)}};
    if (vec)
      row_grads<scalar_t, EdmBwd, true><<<grid, kThreads, 0, stream>>>(in, out, n, EdmBwd{}, rc);
    else
      row_grads<scalar_t, EdmBwd, false><<<grid, kThreads, 0, stream>>>(in, out, n, EdmBwd{}, rc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gd, gt};
}

}  // namespace sfd_fast
