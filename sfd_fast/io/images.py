"""Image grids as PNG (rows per class), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile N images into rows of ``nrow`` with a ``pad``-pixel gap; nearest-neighbour upscale."""
    x = to_uint8(images)
    n, h, w, c = x.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid[..., 0] if c == 1 else grid


def save_grid(images: torch.Tensor, nrow: int, path: str | Path, scale: int = 2) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_grid(images, nrow, scale)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
