"""Fused EDM denoising loss (Triton), forward and backward: custom ops ``sfd_fast::edm_loss`` and
``sfd_fast::edm_precond_loss`` (the second also fuses the EDM preconditioning epilogue).

Matches ``sfd_fast.core.losses.edm_denoising_loss``. Per row i of N pixels, e = D - target:

    per_sample_i = sum e^2,   total = sum_{i: finite} w_i per_sample_i
    dLoss/dD = 2 c_i e,   dLoss/dtarget = -2 c_i e,   c_i = g_total w_i + g_per_sample_i (0 on masked rows)

With the epilogue fused (``edm_precond_loss``), D = c_skip_i x + c_out_i F is never written to
memory: dLoss/dF = c_out_i dLoss/dD and dLoss/dx = c_skip_i dLoss/dD. c_skip, c_out depend only
on sigma and are constants here (asking for their gradient raises).

Passes over HBM: 2. Forward = 1 pass reading D and target (2N; with the epilogue F, x, target =
3N instead of the eager epilogue's 3N + 2N, and no D buffer) + a finalise over (B, n_chunks)
scalars. Backward = 1 pass re-reading the inputs and writing only the gradients autograd asks
for: the fake-score step needs dLoss/dD (or dF) alone, as the target x_g is detached.
Masked (non-finite) rows get exactly zero gradients, as in the reference. Math in fp32, gradients in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_inputs, empty_output as _empty, finalise, row_coefficient, tiling


@triton.jit
def _edm_forward_kernel(a_ptr, t_ptr, x_ptr, cskip_ptr, cout_ptr, part_ptr, N, CHUNK, n_chunks,
                        PRECOND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * N
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, N)
    if PRECOND:
        cs = tl.load(cskip_ptr + row)
        co = tl.load(cout_ptr + row)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        den = tl.load(a_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        if PRECOND:
            den = cs * tl.load(x_ptr + base + idx, mask=m, other=0.0).to(tl.float32) + co * den
        e = den - tl.load(t_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        acc += e * e
    out = (row * n_chunks + chunk) * 2
    tl.store(part_ptr + out, 0.0)
    tl.store(part_ptr + out + 1, tl.sum(acc))


@triton.jit
def _edm_backward_kernel(a_ptr, t_ptr, x_ptr, cskip_ptr, cout_ptr, scale_ptr, ga_ptr, gt_ptr, gx_ptr, N, CHUNK,
                         PRECOND: tl.constexpr, WRITE_A: tl.constexpr, WRITE_T: tl.constexpr,
                         WRITE_X: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * N
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, N)
    s = 2.0 * tl.load(scale_ptr + row)  # 2 c_i; exactly 0 on masked rows
    keep = s != 0.0
    cs = 1.0
    co = 1.0
    if PRECOND:
        cs = tl.load(cskip_ptr + row)
        co = tl.load(cout_ptr + row)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        den = tl.load(a_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        if PRECOND:
            den = cs * tl.load(x_ptr + base + idx, mask=m, other=0.0).to(tl.float32) + co * den
        e = den - tl.load(t_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        g = tl.where(keep, s * e, 0.0)  # dLoss/dD
        if WRITE_A:
            tl.store(ga_ptr + base + idx, (co * g).to(ga_ptr.dtype.element_ty), mask=m)
        if WRITE_T:
            tl.store(gt_ptr + base + idx, (-g).to(gt_ptr.dtype.element_ty), mask=m)
        if WRITE_X:
            tl.store(gx_ptr + base + idx, (cs * g).to(gx_ptr.dtype.element_ty), mask=m)


def _row_vector(c: torch.Tensor, batch: int, name: str, device: torch.device) -> torch.Tensor:
    if c.device != device:
        raise ValueError(f"{name} is on {c.device} but network_out is on {device}; they must be equal")
    if c.numel() != batch or (c.dim() > 0 and c.shape[0] != batch):
        raise ValueError(f"{name} has shape {tuple(c.shape)}; expected one value per sample, e.g. ({batch},) "
                         f"or ({batch}, 1, 1, 1)")
    return c.reshape(batch).float().contiguous()


def _forward(a, target, x, c_skip, c_out, weight, precond: bool, block: int, chunk: int):
    batch = a.shape[0]
    n = a.numel() // batch
    blk, chk, n_chunks = tiling(batch, n, a.device, block, chunk)
    partials = torch.empty((batch, n_chunks, 2), device=a.device, dtype=torch.float32)
    _edm_forward_kernel[(batch, n_chunks)](a, target, x, c_skip, c_out, partials, n, chk, n_chunks,
                                           PRECOND=precond, BLOCK=blk)
    total, per_sample, _ones = finalise(partials, weight, n, 0.0, sid=False)
    return total, per_sample


def _backward_launch(a, target, x, c_skip, c_out, scale, precond, need_a, need_t, need_x, block, chunk):
    batch = a.shape[0]
    n = a.numel() // batch
    blk, chk, n_chunks = tiling(batch, n, a.device, block, chunk)
    ga = torch.empty_like(a) if need_a else _empty(a)
    gt = torch.empty_like(target) if need_t else _empty(a)
    gx = torch.empty_like(x) if need_x else _empty(a)
    _edm_backward_kernel[(batch, n_chunks)](a, target, x, c_skip, c_out, scale.float().contiguous(), ga, gt, gx, n,
                                            chk, PRECOND=precond, WRITE_A=need_a, WRITE_T=need_t, WRITE_X=need_x,
                                            BLOCK=blk)
    return ga, gt, gx


# ---- plain loss: D given ----------------------------------------------------------------------

@torch.library.custom_op("sfd_fast::edm_loss", mutates_args=())
def edm_loss_op(denoised: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, block: int = 0,
                chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(total fp32 0-d, per_sample fp32 (B,)). denoised, target: (B, ...) one dtype; weight (B,)."""
    check_inputs(("denoised", "target"), (denoised, target), weight)
    return _forward(denoised, target, denoised, weight, weight, weight, False, block, chunk)


@edm_loss_op.register_fake
def _(denoised, target, weight, block=0, chunk=0):
    check_inputs(("denoised", "target"), (denoised, target), weight, runnable=False)
    return denoised.new_empty((), dtype=torch.float32), denoised.new_empty((denoised.shape[0],), dtype=torch.float32)


@torch.library.custom_op("sfd_fast::edm_loss_backward", mutates_args=())
def edm_loss_backward_op(denoised: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, need_d: bool,
                         need_t: bool, block: int = 0, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(dLoss/ddenoised, dLoss/dtarget) for per-row scale c_i (B,); one not asked for is empty."""
    ga, gt, _ = _backward_launch(denoised, target, denoised, scale, scale, scale, False, need_d, need_t, False,
                                 block, chunk)
    return ga, gt


@edm_loss_backward_op.register_fake
def _(denoised, target, scale, need_d, need_t, block=0, chunk=0):
    return (torch.empty_like(denoised) if need_d else _empty(denoised),
            torch.empty_like(target) if need_t else _empty(denoised))


def _edm_setup(ctx, inputs, output):
    denoised, target, weight, block, chunk = inputs
    ctx.save_for_backward(denoised, target, weight, output[1])
    ctx.block, ctx.chunk = block, chunk


def _edm_backward(ctx, grad_total, grad_per_sample):
    denoised, target, weight, per_sample = ctx.saved_tensors
    need_d, need_t, need_w = ctx.needs_input_grad[:3]
    scale = row_coefficient(per_sample, weight, grad_total, grad_per_sample)
    gd, gt = edm_loss_backward_op(denoised, target, scale, need_d, need_t, ctx.block, ctx.chunk)
    return (gd if need_d else None, gt if need_t else None, _weight_grad(need_w, per_sample, grad_total, weight),
            None, None)


edm_loss_op.register_autograd(_edm_backward, setup_context=_edm_setup)


# ---- loss with the preconditioning epilogue: D = c_skip x + c_out F ---------------------------

@torch.library.custom_op("sfd_fast::edm_precond_loss", mutates_args=())
def edm_precond_loss_op(network_out: torch.Tensor, x: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor,
                        target: torch.Tensor, weight: torch.Tensor, block: int = 0,
                        chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM loss of D = c_skip x + c_out F without materialising D. F, x, target (B, ...); c_* B values."""
    check_inputs(("network_out", "x", "target"), (network_out, x, target), weight)
    batch = network_out.shape[0]
    c_skip = _row_vector(c_skip, batch, "c_skip", network_out.device)
    c_out = _row_vector(c_out, batch, "c_out", network_out.device)
    return _forward(network_out, target, x, c_skip, c_out, weight, True, block, chunk)


@edm_precond_loss_op.register_fake
def _(network_out, x, c_skip, c_out, target, weight, block=0, chunk=0):
    check_inputs(("network_out", "x", "target"), (network_out, x, target), weight, runnable=False)
    return (network_out.new_empty((), dtype=torch.float32),
            network_out.new_empty((network_out.shape[0],), dtype=torch.float32))


@torch.library.custom_op("sfd_fast::edm_precond_loss_backward", mutates_args=())
def edm_precond_loss_backward_op(network_out: torch.Tensor, x: torch.Tensor, c_skip: torch.Tensor,
                                 c_out: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, need_f: bool,
                                 need_x: bool, need_t: bool, block: int = 0,
                                 chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dLoss/dF, dLoss/dx, dLoss/dtarget) for per-row scale c_i (B,); one not asked for is empty."""
    batch = network_out.shape[0]
    c_skip = _row_vector(c_skip, batch, "c_skip", network_out.device)
    c_out = _row_vector(c_out, batch, "c_out", network_out.device)
    gf, gt, gx = _backward_launch(network_out, target, x, c_skip, c_out, scale, True, need_f, need_t, need_x,
                                  block, chunk)
    return gf, gx, gt


@edm_precond_loss_backward_op.register_fake
def _(network_out, x, c_skip, c_out, target, scale, need_f, need_x, need_t, block=0, chunk=0):
    return (torch.empty_like(network_out) if need_f else _empty(network_out), torch.empty_like(x) if need_x else _empty(network_out),
            torch.empty_like(target) if need_t else _empty(network_out))


def _precond_setup(ctx, inputs, output):
    network_out, x, c_skip, c_out, target, weight, block, chunk = inputs
    ctx.save_for_backward(network_out, x, c_skip, c_out, target, weight, output[1])
    ctx.block, ctx.chunk = block, chunk


def _precond_backward(ctx, grad_total, grad_per_sample):
    network_out, x, c_skip, c_out, target, weight, per_sample = ctx.saved_tensors
    need_f, need_x, need_cs, need_co, need_t, need_w = ctx.needs_input_grad[:6]
    if need_cs or need_co:
        raise NotImplementedError("edm_precond_loss treats c_skip and c_out as constants (they depend on sigma "
                                  "only); detach them, or use the unfused loss to differentiate them")
    scale = row_coefficient(per_sample, weight, grad_total, grad_per_sample)
    gf, gx, gt = edm_precond_loss_backward_op(network_out, x, c_skip, c_out, target, scale, need_f, need_x, need_t,
                                              ctx.block, ctx.chunk)
    return (gf if need_f else None, gx if need_x else None, None, None, gt if need_t else None,
            _weight_grad(need_w, per_sample, grad_total, weight), None, None)


edm_precond_loss_op.register_autograd(_precond_backward, setup_context=_precond_setup)


def _weight_grad(need_w, per_sample, grad_total, weight):
    """d total / d w_i = per_sample_i on finite rows."""
    if not need_w or grad_total is None:
        return None
    return torch.where(torch.isfinite(per_sample), per_sample * grad_total, 0.0).to(weight.dtype)


# ---- public functions -------------------------------------------------------------------------

def edm_denoising_loss(denoised: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused drop-in for ``sfd_fast.core.losses.edm_denoising_loss``.

    denoised, target: (B, ...) of one layout (contiguous or channels_last), one dtype
    (fp32/bf16/fp16), one device; weight (B,).
    Returns (total fp32 0-d, per_sample fp32 (B,)).
    """
    return edm_loss_op(denoised, target, weight)


def edm_precond_denoising_loss(network_out: torch.Tensor, x: torch.Tensor, c_skip: torch.Tensor,
                               c_out: torch.Tensor, target: torch.Tensor,
                               weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM loss of D = c_skip x + c_out F, fused (``EDMDenoiser.network_output`` gives (F, c_skip, c_out)).

    network_out F, x, target: (B, ...) one dtype; c_skip, c_out: B values ((B,) or (B, 1, 1, 1)),
    constants for autograd; weight (B,). Returns (total fp32 0-d, per_sample fp32 (B,)).
    """
    return edm_precond_loss_op(network_out, x, c_skip, c_out, target, weight)


__all__ = ["edm_denoising_loss", "edm_precond_denoising_loss", "edm_loss_op", "edm_precond_loss_op"]
