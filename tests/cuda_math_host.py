"""The CUDA path's math on the CPU: csrc/loss_math.h built for the host, as autograd losses.

``load()`` compiles ``csrc/host_reference/loss_math_host.cpp`` (the functions the CUDA kernels
run, driven over CPU tensors; ops ``torch.ops.sfd_fast_host_ref.*`` with the schemas and argument
checks of ``torch.ops.sfd_fast_C.*``) once per process, cached on disk under
``<tmp>/torch-extensions/sfd_fast_host_ref`` so later processes only relink if the sources
changed. It returns an object with

- ``sid_generator_loss(x_g, y_real, y_fake, weight, *, alpha, omega_min=1e-5) -> (total, per_sample)``
- ``edm_denoising_loss(denoised, target, weight) -> (total, per_sample)``

with the signatures of ``sfd_fast.core.losses`` and the CUDA wrapper's semantics
(``sfd_fast.core.cuda_ext``): same Python-side validation, same need flags, masked rows with exact
zero gradients, no gradient for ``weight``. CPU tensors only. For tests: a cross-backend fault
test can put it beside the torch reference and the Triton interpreter on a machine with no GPU.
"""

from __future__ import annotations

import functools
import tempfile
import time
import types
from pathlib import Path

import torch

from sfd_fast.core import cuda_ext

SOURCE = cuda_ext.CSRC_DIR / "host_reference" / "loss_math_host.cpp"
NAME = "sfd_fast_host_ref"
BUILD_DIR = Path(tempfile.gettempdir()) / "torch-extensions" / NAME
# -O2, deliberately no -ffast-math: the NaN/inf tests need IEEE comparisons (is_finite, the
# NaN-keeping clamp of omega).
CFLAGS = ["-O2"]
BUILD_SECONDS: float | None = None  # wall time of load()'s build step, for reports


@functools.cache  # a namespace can be registered once per process
def load() -> types.SimpleNamespace:
    """Build (or reuse) and load the host ops; returns the two losses. Raises if the build fails."""
    global BUILD_SECONDS
    from torch.utils.cpp_extension import load as load_extension

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    load_extension(name=NAME, sources=[str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(BUILD_DIR),
                   is_python_module=False, verbose=False)
    BUILD_SECONDS = time.perf_counter() - start
    return types.SimpleNamespace(sid_generator_loss=sid_generator_loss, edm_denoising_loss=edm_denoising_loss,
                                 ops=getattr(torch.ops, NAME))


def sid_generator_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, weight: torch.Tensor, *,
                       alpha: float, omega_min: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Host build of the fused SiD loss: (total () fp32, per_sample (B,) fp32)."""
    cuda_ext._check_images((x_g, "x_g"), (y_real, "y_real"), (y_fake, "y_fake"))
    weight = cuda_ext._check_weight(weight, x_g)
    return _Sid.apply(x_g, y_real, y_fake, weight, float(alpha), float(omega_min))


def edm_denoising_loss(denoised: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Host build of the fused EDM loss: (total () fp32, per_sample (B,) fp32)."""
    cuda_ext._check_images((denoised, "denoised"), (target, "target"))
    weight = cuda_ext._check_weight(weight, denoised)
    return _Edm.apply(denoised, target, weight)


class _Sid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_g, y_real, y_fake, weight, alpha, omega_min):
        total, per_sample, omega = torch.ops.sfd_fast_host_ref.sid_loss_fwd(x_g, y_real, y_fake, weight, alpha,
                                                                            omega_min)
        ctx.save_for_backward(x_g, y_real, y_fake, weight, per_sample, omega)
        ctx.alpha = alpha
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, as in cuda_ext
        return total, per_sample

    @staticmethod
    def backward(ctx, grad_total, grad_per_sample):
        x_g, y_real, y_fake, weight, per_sample, omega = ctx.saved_tensors
        grad_total, grad_per_sample = cuda_ext._upstream(grad_total, grad_per_sample, x_g)
        need = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        grads = torch.ops.sfd_fast_host_ref.sid_loss_bwd(grad_total, grad_per_sample, x_g, y_real, y_fake, weight,
                                                         per_sample, omega, ctx.alpha, *need)
        return (*(g if n else None for g, n in zip(grads, need)), None, None, None)


class _Edm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, denoised, target, weight):
        total, per_sample = torch.ops.sfd_fast_host_ref.edm_loss_fwd(denoised, target, weight)
        ctx.save_for_backward(denoised, target, weight, per_sample)
        ctx.set_materialize_grads(False)
        return total, per_sample

    @staticmethod
    def backward(ctx, grad_total, grad_per_sample):
        denoised, target, weight, per_sample = ctx.saved_tensors
        grad_total, grad_per_sample = cuda_ext._upstream(grad_total, grad_per_sample, denoised)
        need = tuple(bool(n) for n in ctx.needs_input_grad[:2])
        grads = torch.ops.sfd_fast_host_ref.edm_loss_bwd(grad_total, grad_per_sample, denoised, target, weight,
                                                         per_sample, *need)
        return (*(g if n else None for g, n in zip(grads, need)), None)


__all__ = ["load", "SOURCE", "BUILD_DIR"]
