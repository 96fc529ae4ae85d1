"""Fused SiD/SFD generator loss (Triton), forward and backward, as the custom op ``sfd_fast::sid_loss``.

Matches ``sfd_fast.core.losses.sid_generator_loss`` (the reference; see it for the math). Per row i of
N pixels, with d = y_r - y_f and r = y_r - x_g:

    omega_i = max(mean |r|, omega_min)          (a constant for autograd: stopgrad)
    L_i     = sum d * (r - alpha d) / omega_i
    total   = sum_{i: L_i finite} w_i L_i

Gradients (omega constant; c_i = dLoss/dL_i = g_total w_i + g_per_sample_i on finite rows):

    dL/dx_g = -c_i d / omega_i
    dL/dy_r =  c_i (r + (1 - 2 alpha) d) / omega_i
    dL/dy_f =  c_i (-r + 2 alpha d) / omega_i

Passes over HBM: 2. Forward = 1 pass reading x_g, y_r, y_f (3N per row; both reductions,
sum |r| and sum d(r - alpha d), from one read) + a one-program finalise over (B, n_chunks)
scalars. Backward = 1 pass reading the three inputs and writing the gradients that autograd
asks for (3N read + up to 3N written). Why not compute the gradients inside the forward: the
scalar upstream gradient is unknown until backward, so forward-saved gradients would have to be
written (3N) and then re-read and scaled (3N + 3N): 12N traffic instead of 9N.

Masked rows: where L_i is not finite the kernel returns exactly zero gradients, as the reference
does (a NaN row, an inf row and a row with NaN omega alike). Math is fp32; gradients come back in the
input dtype; total and per_sample are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_inputs, empty_output as _empty, finalise, row_coefficient, tiling


@triton.jit
def _sid_forward_kernel(x_ptr, yr_ptr, yf_ptr, part_ptr, N, CHUNK, n_chunks, alpha, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * N
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, N)
    acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        # Convert on load: all arithmetic in fp32 (bf16 math is also wrong in the interpreter).
        x = tl.load(x_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        yr = tl.load(yr_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        yf = tl.load(yf_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        d = yr - yf
        r = yr - x
        acc_abs += tl.abs(r)
        acc_loss += d * (r - alpha * d)
    out = (row * n_chunks + chunk) * 2
    tl.store(part_ptr + out, tl.sum(acc_abs))
    tl.store(part_ptr + out + 1, tl.sum(acc_loss))


@triton.jit
def _sid_backward_kernel(x_ptr, yr_ptr, yf_ptr, scale_ptr, gx_ptr, gyr_ptr, gyf_ptr, N, CHUNK, alpha,
                         WRITE_X: tl.constexpr, WRITE_YR: tl.constexpr, WRITE_YF: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * N
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, N)
    s = tl.load(scale_ptr + row)  # c_i / omega_i; exactly 0 on masked rows
    keep = s != 0.0  # so NaN/inf inputs of masked rows give 0, not 0 * NaN
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        x = tl.load(x_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        yr = tl.load(yr_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        yf = tl.load(yf_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        d = yr - yf
        r = yr - x
        if WRITE_X:
            g = tl.where(keep, -s * d, 0.0)
            tl.store(gx_ptr + base + idx, g.to(gx_ptr.dtype.element_ty), mask=m)
        if WRITE_YR:
            g = tl.where(keep, s * (r + (1.0 - 2.0 * alpha) * d), 0.0)
            tl.store(gyr_ptr + base + idx, g.to(gyr_ptr.dtype.element_ty), mask=m)
        if WRITE_YF:
            g = tl.where(keep, s * (2.0 * alpha * d - r), 0.0)
            tl.store(gyf_ptr + base + idx, g.to(gyf_ptr.dtype.element_ty), mask=m)


@torch.library.custom_op("sfd_fast::sid_loss", mutates_args=())
def sid_loss_op(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, weight: torch.Tensor,
                alpha: float, omega_min: float, block: int = 0, chunk: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total 0-d, per_sample (B,), omega (B,)), fp32. Inputs (B, ...) of one dtype; weight (B,)."""
    check_inputs(("x_g", "y_real", "y_fake"), (x_g, y_real, y_fake), weight)
    batch = x_g.shape[0]
    n = x_g.numel() // batch
    blk, chk, n_chunks = tiling(batch, n, x_g.device, block, chunk)
    partials = torch.empty((batch, n_chunks, 2), device=x_g.device, dtype=torch.float32)
    _sid_forward_kernel[(batch, n_chunks)](x_g, y_real, y_fake, partials, n, chk, n_chunks, float(alpha), BLOCK=blk)
    return finalise(partials, weight, n, float(omega_min), sid=True)


@sid_loss_op.register_fake
def _(x_g, y_real, y_fake, weight, alpha, omega_min, block=0, chunk=0):
    check_inputs(("x_g", "y_real", "y_fake"), (x_g, y_real, y_fake), weight, runnable=False)
    batch = x_g.shape[0]
    return (x_g.new_empty((), dtype=torch.float32), x_g.new_empty((batch,), dtype=torch.float32),
            x_g.new_empty((batch,), dtype=torch.float32))


@torch.library.custom_op("sfd_fast::sid_loss_backward", mutates_args=())
def sid_loss_backward_op(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, scale: torch.Tensor,
                         alpha: float, need_x: bool, need_yr: bool, need_yf: bool, block: int = 0,
                         chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x_g, y_real, y_fake) in the input dtype for the per-row ``scale`` (B,) = c_i / omega_i.

    A gradient not asked for comes back as an empty tensor and is never written.
    """
    batch = x_g.shape[0]
    n = x_g.numel() // batch
    blk, chk, n_chunks = tiling(batch, n, x_g.device, block, chunk)
    gx = torch.empty_like(x_g) if need_x else _empty(x_g)
    gyr = torch.empty_like(y_real) if need_yr else _empty(x_g)
    gyf = torch.empty_like(y_fake) if need_yf else _empty(x_g)
    _sid_backward_kernel[(batch, n_chunks)](x_g, y_real, y_fake, scale.float().contiguous(), gx, gyr, gyf, n, chk,
                                            float(alpha), WRITE_X=need_x, WRITE_YR=need_yr, WRITE_YF=need_yf,
                                            BLOCK=blk)
    return gx, gyr, gyf


@sid_loss_backward_op.register_fake
def _(x_g, y_real, y_fake, scale, alpha, need_x, need_yr, need_yf, block=0, chunk=0):
    return (torch.empty_like(x_g) if need_x else _empty(x_g), torch.empty_like(y_real) if need_yr else _empty(x_g),
            torch.empty_like(y_fake) if need_yf else _empty(x_g))


def _setup_context(ctx, inputs, output):
    x_g, y_real, y_fake, weight, alpha, _omega_min, block, chunk = inputs
    _total, per_sample, omega = output
    ctx.save_for_backward(x_g, y_real, y_fake, weight, per_sample, omega)
    ctx.alpha, ctx.block, ctx.chunk = alpha, block, chunk


def _backward(ctx, grad_total, grad_per_sample, _grad_omega):
    x_g, y_real, y_fake, weight, per_sample, omega = ctx.saved_tensors
    need_x, need_yr, need_yf, need_w = ctx.needs_input_grad[:4]
    scale = row_coefficient(per_sample, weight, grad_total, grad_per_sample, omega)
    gx, gyr, gyf = sid_loss_backward_op(x_g, y_real, y_fake, scale, ctx.alpha, need_x, need_yr, need_yf,
                                        ctx.block, ctx.chunk)
    grad_weight = None
    if need_w and grad_total is not None:  # d total / d w_i = L_i on finite rows
        grad_weight = torch.where(torch.isfinite(per_sample), per_sample * grad_total, 0.0).to(weight.dtype)
    return (gx if need_x else None, gyr if need_yr else None, gyf if need_yf else None, grad_weight,
            None, None, None, None)


sid_loss_op.register_autograd(_backward, setup_context=_setup_context)


def sid_generator_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, weight: torch.Tensor, *,
                       alpha: float, omega_min: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused drop-in for ``sfd_fast.core.losses.sid_generator_loss``.

    x_g, y_real, y_fake: (B, ...) of one layout (contiguous or channels_last), one dtype
    (fp32/bf16/fp16), one device (CUDA, or CPU under TRITON_INTERPRET=1); weight: (B,). Returns (total fp32 0-d, per_sample fp32 (B,)).
    """
    total, per_sample, _omega = sid_loss_op(x_g, y_real, y_fake, weight, float(alpha), float(omega_min))
    return total, per_sample


__all__ = ["sid_generator_loss", "sid_loss_op", "sid_loss_backward_op"]
