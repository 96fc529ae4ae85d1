"""One tensor per prompt: token embeddings with the pooled embedding packed behind them.

``train_step`` moves a text condition around as one float tensor c (B, L, D): it indexes rows,
swaps forget for override rows, drops prompts to "" with ``torch.where``, and adds adversarial
offsets. Backbones that take a second, pooled text vector (SD3's ``pooled_projections``, SDXL's
``text_embeds``) get it through the same tensor: ``PackedText`` appends the pooled vector (P,)
as ``k = ceil(P / D)`` extra rows (row-major, zero-padded), so c is (B, L + k, D) and every
row operation above applies to both parts at once. Unpacking is two slices (ONNX-exportable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedText:
    """Layout of a packed condition: ``length`` token rows of width ``width``, then ``pooled_dim`` values."""

    length: int      # L: token rows (text encoder sequence length)
    width: int       # D: token embedding width (the transformer's joint / cross attention dim)
    pooled_dim: int  # P: pooled vector length (0: none)

    @property
    def extra_rows(self) -> int:
        return math.ceil(self.pooled_dim / self.width) if self.pooled_dim else 0

    @property
    def shape(self) -> tuple[int, int]:
        """(L + k, D): the per-sample shape of the packed condition."""
        return (self.length + self.extra_rows, self.width)

    def pack(self, hidden: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (N, L, D), pooled (N, P) -> c (N, L + k, D)."""
        if hidden.dim() != 3 or tuple(hidden.shape[1:]) != (self.length, self.width):
            raise ValueError(f"token embeddings must be (N, {self.length}, {self.width}), got {tuple(hidden.shape)}")
        if not self.pooled_dim:
            return hidden
        if pooled is None or tuple(pooled.shape) != (hidden.shape[0], self.pooled_dim):
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"pooled embeddings must be ({hidden.shape[0]}, {self.pooled_dim}), got {got}")
        pad = self.extra_rows * self.width - self.pooled_dim
        rows = torch.nn.functional.pad(pooled.to(hidden.dtype), (0, pad)).reshape(-1, self.extra_rows, self.width)
        return torch.cat([hidden, rows], dim=1)

    def unpack(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """c (B, L + k, D) -> (hidden (B, L, D), pooled (B, P) or None)."""
        if c.dim() != 3 or tuple(c.shape[1:]) != self.shape:
            raise ValueError(f"text condition must be (B, {self.shape[0]}, {self.shape[1]}) "
                             f"({self.length} token rows + {self.extra_rows} pooled rows), got {tuple(c.shape)}")
        hidden = c[:, :self.length]
        if not self.pooled_dim:
            return hidden, None
        return hidden, c[:, self.length:].reshape(c.shape[0], -1)[:, :self.pooled_dim]

    def to_dict(self) -> dict:
        return {"length": self.length, "width": self.width, "pooled_dim": self.pooled_dim}


__all__ = ["PackedText"]
