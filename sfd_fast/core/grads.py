"""Gradient plumbing shared by both step paths: freeze a network's weights, sanitize gradients."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Gradients flow through the module's inputs but no weight gradient is computed."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def sanitize_grads(params, clip_value: float | None) -> None:
    """The reference's nan_to_num(nan=0, posinf=1e5, neginf=-1e5), then clip by value."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    if clip_value is not None and grads:
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)
