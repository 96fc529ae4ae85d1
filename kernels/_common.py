"""Shared pieces of the fused loss kernels: input checks, row tiling, the per-row finalise kernel.

Layout every loss kernel uses: the inputs are B rows of N = numel/B elements, each row one dense
block of memory at offset b*N, with the same strides in every input (contiguous NCHW, or
channels_last NHWC: the row sums do not depend on element order, and gradients allocated with
``empty_like`` get the inputs' strides, so element k of a row is the same pixel everywhere). Pass 1
runs a (B, n_chunks) grid; each program reduces one chunk of one row into fp32 partial sums
(written to a tiny (B, n_chunks, 2) buffer: deterministic, no atomics). A one-program finalise
kernel then turns the partials into per_sample (B,), omega (B,) and the masked weighted total,
so the forward is one pass over the data plus O(B * n_chunks) scalar work.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton import knobs

# triton.jit decides at decoration time whether kernels run in the CPU interpreter.
INTERPRETED: bool = bool(knobs.runtime.interpret)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], weight: torch.Tensor,
                 runnable: bool = True) -> None:
    """Raise a ValueError naming the bad tensor for every condition the kernels rely on.

    ``runnable=False`` (fake/meta tensors, used when tracing) skips the can-Triton-run-here check.
    """
    first, name0 = tensors[0], names[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: {DTYPES}")
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {name0} has {tuple(first.shape)}; "
                             "they must be equal")
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {name0} has {first.dtype}; they must be equal")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {first.device}; they must be equal")
    if first.dim() < 2 or first.shape[0] == 0 or first.numel() == 0:
        raise ValueError(f"{name0} must be a non-empty batch (B, ...) with B >= 1, got shape {tuple(first.shape)}")
    for name, t in zip(names, tensors):
        if not rows_are_dense(t):
            raise ValueError(f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) does not store each sample as one "
                             "dense block; call .contiguous() or .contiguous(memory_format=torch.channels_last) "
                             "(the kernel reads rows as flat memory and will not copy silently)")
        if layout(t) != layout(first):
            raise ValueError(f"{name} has strides {t.stride()} but {name0} has {first.stride()}; all inputs must share "
                             "one memory layout (convert them with the same .contiguous(memory_format=...))")
    if weight.shape != (first.shape[0],):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({first.shape[0]},), one per sample")
    if not weight.is_floating_point():
        raise ValueError(f"weight has dtype {weight.dtype}; it must be a floating dtype")
    if weight.device != first.device:
        raise ValueError(f"weight is on {weight.device} but {name0} is on {first.device}; they must be equal")
    if runnable:
        check_device(first.device)


def rows_are_dense(t: torch.Tensor) -> bool:
    """Each of the B samples is one gap-free block of numel/B elements, sample b at offset b*numel/B."""
    dims = sorted((st, size) for st, size in zip(t.stride(), t.shape) if size > 1)
    expected = 1
    for st, size in dims:  # innermost first: a dense layout packs each dim right after the last
        if st != expected:
            return False
        expected *= size
    return t.shape[0] == 1 or t.stride(0) == t.numel() // t.shape[0]


def layout(t: torch.Tensor) -> tuple[int, ...]:
    """The strides that matter (a size-1 dim's stride is arbitrary): equal layouts index alike."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def check_device(device: torch.device) -> None:
    """Triton runs CUDA tensors, or CPU tensors when the kernels were built for the interpreter."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and INTERPRETED:
        return
    raise ValueError(f"the Triton kernels need CUDA tensors (got {device}); CPU tensors only run in the "
                     "Triton interpreter, i.e. with TRITON_INTERPRET=1 set before sfd_fast.kernels is imported")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count


def tiling(batch: int, n: int, device: torch.device, block: int = 0, chunk: int = 0) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, n_chunks) for B rows of n elements.

    A heuristic instead of @triton.autotune (which cannot run in the CPU interpreter): BLOCK is
    1024 elements per iteration (4 warps, 8 fp32 per thread) and rows are split into chunks so
    that the grid has about 4 programs per SM, because one program per row leaves most SMs
    idle at training batch sizes (B = 8..64). ``block``/``chunk`` > 0 override (tests use it).
    """
    if block <= 0:
        block = min(1024, triton.next_power_of_2(n)) if device.type == "cuda" else min(256, triton.next_power_of_2(n))
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if chunk <= 0:
        programs = 4 * _sm_count(device.index) if device.type == "cuda" else batch
        n_chunks = max(1, min(triton.cdiv(programs, batch), triton.cdiv(n, block)))
        chunk = triton.cdiv(triton.cdiv(n, n_chunks), block) * block
    chunk = max(block, triton.cdiv(chunk, block) * block)
    return block, chunk, triton.cdiv(n, chunk)


@triton.jit
def finalise_kernel(part_ptr, weight_ptr, per_sample_ptr, omega_ptr, total_ptr, B, n_chunks, inv_n, omega_min,
                    SID: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: sum partials over chunks, per-sample loss, omega, masked weighted total.

    partials (B, n_chunks, 2): [..., 0] = sum |x_g - y_r| (SiD only), [..., 1] = the loss sum.
    SID: omega = max(mean |x_g - y_r|, omega_min) (NaN kept), per_sample = loss / omega.
    EDM: omega = 1, per_sample = loss. Non-finite per_sample rows are left out of the total.
    """
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        m = rows < B
        s_abs = tl.zeros([BLOCK_B], dtype=tl.float32)
        s_loss = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c in range(0, n_chunks):
            base = (rows * n_chunks + c) * 2
            s_abs += tl.load(part_ptr + base, mask=m, other=0.0)
            s_loss += tl.load(part_ptr + base + 1, mask=m, other=0.0)
        if SID:
            omega = tl.maximum(s_abs * inv_n, omega_min, propagate_nan=tl.PropagateNan.ALL)
        else:
            omega = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
        per_sample = s_loss / omega
        w = tl.load(weight_ptr + rows, mask=m, other=0.0).to(tl.float32)
        finite = tl.abs(per_sample) <= 3.4028234663852886e38  # FLT_MAX: False for NaN and +-inf
        acc += tl.where(finite & m, per_sample * w, 0.0)
        tl.store(per_sample_ptr + rows, per_sample, mask=m)
        tl.store(omega_ptr + rows, omega, mask=m)
    tl.store(total_ptr, tl.sum(acc))


def finalise(partials: torch.Tensor, weight: torch.Tensor, n: int, omega_min: float, sid: bool):
    """Launch ``finalise_kernel``; returns (total 0-d, per_sample (B,), omega (B,)), all fp32."""
    batch, n_chunks = partials.shape[0], partials.shape[1]
    per_sample = torch.empty(batch, device=partials.device, dtype=torch.float32)
    omega = torch.empty_like(per_sample)
    total = torch.empty((), device=partials.device, dtype=torch.float32)
    block_b = min(1024, triton.next_power_of_2(batch))
    finalise_kernel[(1,)](partials, weight.float().contiguous(), per_sample, omega, total, batch, n_chunks,
                          1.0 / n, omega_min, SID=sid, BLOCK_B=block_b)
    return total, per_sample, omega


def row_coefficient(per_sample: torch.Tensor, weight: torch.Tensor, grad_total: torch.Tensor | None,
                    grad_per_sample: torch.Tensor | None, omega: torch.Tensor | None = None) -> torch.Tensor:
    """dLoss/dper_sample_i / omega_i for the backward: exactly 0 on masked rows.

    On finite rows (g_total * w_i + g_ps_i) / omega_i (omega None: 1). The mask is applied after
    the division: a NaN input row has omega NaN, and 0 / NaN would leak NaN into its gradients.
    (B,)-sized tensor ops only: no host sync, nothing data-dependent in Python.
    """
    coef = torch.zeros_like(per_sample)
    if grad_total is not None:
        coef = coef + grad_total.float() * weight.float()
    if grad_per_sample is not None:
        coef = coef + grad_per_sample.float()
    if omega is not None:
        coef = coef / omega
    return torch.where(torch.isfinite(per_sample), coef, torch.zeros_like(coef))


def empty_output(like: torch.Tensor) -> torch.Tensor:
    """A fresh (0,)-shaped stand-in for a gradient nobody asked for (custom-op outputs may not alias)."""
    return like.new_empty((0,))
