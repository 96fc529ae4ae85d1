"""Inputs and tolerance checks shared by the fused-loss tests of the CUDA path (test_cuda_ext.py on
the GPU, test_cuda_math_host.py for its math built for the CPU).

Tolerances. Kernel and reference read the same (possibly low-precision) inputs and both
accumulate in fp32, so the forward differs only by summation order: |k - r| <= 5e-5 x the sum
of |terms| (fp32 rounding of ~N/(threads*splits) sequential adds). Gradients are computed in
fp32 and rounded once to the input dtype, so they may differ from the fp32 reference by one
rounding: rtol = the dtype's eps (twice the half-ulp bound, i.e. the "at most 2x plain
PyTorch's own low-precision error" rule), plus atol = 1e-5 x max|grad| for fp32 cancellation.
"""

from __future__ import annotations

import torch

ALPHA, OMEGA_MIN = 1.2, 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# batch 1; odd sizes (no multiple of a 16-byte vector); 3-D input; a row split over many
# blocks (65536 elements); a large batch of tiny rows.
SHAPES = [(1, 3, 16, 16), (3, 1, 17, 19), (2, 3, 7), (5, 4, 32, 32), (1, 4, 128, 128), (300, 2, 3, 5)]


def images(shape, dtype, device="cuda", seed=0, memory_format=torch.contiguous_format):
    """x_g, y_real, y_fake in `dtype` on `device`, and a weight (B,) with distinct entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    yr = x + 0.5 * torch.randn(shape, generator=g)
    yf = yr + 0.2 * torch.randn(shape, generator=g)
    w = torch.rand(shape[0], generator=g) + 0.5
    return [t.to(device, dtype).contiguous(memory_format=memory_format) for t in (x, yr, yf)], w.to(device)


def leaves(ts, dtype=None):
    """Fresh leaves requiring grad (same strides: .to(dtype) keeps a dense layout)."""
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in ts]


def assert_grad_close(kernel, ref32, dtype, rows=slice(None)):
    k, r = kernel.float()[rows], ref32[rows]
    rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(k, r, rtol=rtol, atol=1e-5 * r.abs().max().item() + 1e-12)


def sid_scale(x, yr, yf):
    """Per row: sum of |terms| / omega, the scale of the forward's summation error."""
    x, yr, yf = x.float(), yr.float(), yf.float()
    d, e = yr - yf, yr - x
    omega = e.abs().flatten(1).mean(1).clamp_min(OMEGA_MIN)
    return (d * (e - ALPHA * d)).abs().flatten(1).sum(1) / omega


def assert_forward_close(kernel, ref, scale):
    assert kernel.dtype == torch.float32 and kernel.shape == ref.shape
    err = (kernel - ref).abs()
    assert bool((err <= 5e-5 * scale + 1e-6).all()), f"max err {err.max().item()} vs scale {scale.max().item()}"


def set_element(t: torch.Tensor, row: int, i: int, value: float) -> None:
    """t[row]'s i-th element in logical (C, H, W) order := value, whatever t's memory layout."""
    idx = torch.unravel_index(torch.tensor(i), t.shape[1:])
    t[(row, *(int(j) for j in idx))] = value


def poison(imgs):
    """Row 1: a NaN in x_g; row 2: an inf in y_fake. Rows 0 and 3 stay finite."""
    return poison_rows(imgs, {1: (0, 5, float("nan")), 2: (2, 0, float("inf"))})


def poison_rows(imgs, rows: dict[int, tuple[int, int, float]]):
    """Copies of imgs (layouts kept) with rows[b] = (input index, element, value) written into row b."""
    imgs = [t.clone() for t in imgs]
    for b, (k, i, value) in rows.items():
        set_element(imgs[k], b, i, value)
    return imgs
