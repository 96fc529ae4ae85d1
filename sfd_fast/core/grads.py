"""Gradient plumbing shared by both step paths: freeze a network's weights, sanitize gradients."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) units inside ``module``, outermost first; [] for a plain module."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _flag_holders(module: nn.Module) -> list[nn.Parameter]:
    """The parameter objects whose ``requires_grad`` decides what backward computes for ``module``.

    A plain module: its parameters. Under FSDP2 the parameters registered on a module alternate:
    the sharded DTensors between steps, the all-gathered unsharded ones from forward until the
    reshard (the root unit is not resharded after forward, and not before its backward), and at
    every all-gather FSDP2 copies the *sharded* parameter's flag onto the unsharded one
    (``FSDPParam.to_unsharded``, torch 2.13). So the sharded parameters are the truth: every
    unit is resharded first (a no-op when it already is), then its registered parameters are
    the sharded ones. A unit whose backward is still pending re-gathers there, as with
    ``reshard_after_forward=True``.
    """
    for unit in fsdp_modules(module):
        unit.reshard()
    return list(module.parameters())


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Gradients flow through the module's inputs but no weight gradient is computed.

    The flags are set and restored on the *same* parameter objects. Re-reading
    ``module.parameters()`` on exit was what broke the first FSDP2 attempt (docs/distributed.md,
    "FSDP2"): exiting between forward and backward, the module held FSDP2's unsharded
    parameters, the restore landed on them, and the sharded parameters stayed frozen for good:
    the next fake-score loss had no grad_fn.
    """
    params = _flag_holders(module)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def backward_inputs(params: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """``inputs=`` for ``loss.backward`` that accumulates into ``params`` (the trained weights).

    None (every leaf that requires grad) when ``params`` are FSDP2 shards: autograd's leaves are
    then FSDP2's unsharded parameters, which exist from the all-gather to the reshard, and the
    shards get their gradient from the reduce-scatter after backward; passing the shards would
    compute no gradient at all. With the other networks frozen (``frozen()``, the teacher's
    flags off) "every leaf" is the same set, so the pruning of their weight gradients holds.
    """
    if any(getattr(p, "placements", None) is not None for p in params):
        return None
    return params


def sanitize_grads(params, clip_value: float | None) -> None:
    """The reference's nan_to_num(nan=0, posinf=1e5, neginf=-1e5), then clip by value."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    if clip_value is not None and grads:
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)
