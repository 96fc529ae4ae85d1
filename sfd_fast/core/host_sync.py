"""Find host syncs: ops that make the host wait for, or read, device memory.

On a GPU each one stalls the CPU until the queued kernels finish (the step can no longer run
ahead of the device), and inside CUDA-graph capture it is an error. ``HostSyncDetector`` is a
``TorchDispatchMode`` that records every such op run under it, with the Python frames that
asked for it::

    with HostSyncDetector() as syncs:
        train_step(state, options="fused")
    assert not syncs.found, syncs.report()

It is also a CPU proxy for the GPU: ``.item()``, ``bool(t)``, ``float(t)``, a Python ``if`` on a
tensor, boolean-mask indexing and ops with data-dependent output shapes dispatch the same aten
ops on either device, so a CPU run at zero has none of those on the GPU either. Blocking
device-to-host copies (``.cpu()``, ``.tolist()``) are visible only with CUDA tensors and are
counted there. What it cannot see: syncs inside a C++ kernel that do not go through the
dispatcher, and tensors that are host-side by design (plain Adam's CPU step counters are read
with ``.item()``: on CPU indistinguishable from a sync, so CPU tests use ``fused`` Adam, which is
what ``SFDState`` builds on CUDA).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result the host must read (a scalar, or a shape that depends on the data).
READS_DEVICE = {
    aten._local_scalar_dense.default,  # .item(), bool(), int(), float(), Python branches on tensors
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}


@dataclass(frozen=True)
class HostSync:
    op: str        # the aten overload, e.g. "aten._local_scalar_dense.default"
    where: str     # the innermost Python frames outside torch that led to it


def _on(device_type: str | None, args) -> bool:
    """The op's first tensor argument lives on ``device_type`` (None: on any device)."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return first is not None and (device_type is None or first.device.type == device_type)


def _is_sync(func, args, kwargs, device_type: str | None) -> bool:
    if func in READS_DEVICE:
        return _on(device_type, args)
    if func in _INDEXING:  # a boolean mask is turned into indices with nonzero() inside the kernel
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return _on(device_type, args) and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                              for i in indices or ())
    if func in _COPIES and not kwargs.get("non_blocking", False):
        if func is aten._to_copy.default:
            src, dst = args[0], kwargs.get("device")
            return src.device.type == "cuda" and dst is not None and torch.device(dst).type == "cpu"
        dst, src = args[0], args[1]
        return src.device.type == "cuda" and dst.device.type == "cpu"
    return False


def _caller_frames(depth: int = 4) -> str:
    """The last ``depth`` frames of the stack that are not torch internals or this module."""
    frames = [f for f in traceback.extract_stack()[:-2]
              if "/torch/" not in f.filename and f.filename != __file__]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1] if '/' in f.filename else f.filename}:{f.lineno} {f.name}"
                       for f in reversed(frames[-depth:]))


class HostSyncDetector(TorchDispatchMode):
    """Records every host-syncing op dispatched while active (see the module docstring).

    ``device``: count only reads of that device's memory ("cuda": a host read of a CPU tensor,
    such as plain Adam's step counter, is no sync there); None counts every device (CPU proxy).
    """

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device_type = None if device is None else torch.device(device).type
        self.found: list[HostSync] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs, self.device_type):
            self.found.append(HostSync(str(func), _caller_frames()))
        return func(*args, **kwargs)

    def report(self, limit: int = 10) -> str:
        """One line per recorded sync (the first ``limit``), or "no host syncs"."""
        if not self.found:
            return "no host syncs"
        lines = [f"{len(self.found)} host sync(s):"]
        lines += [f"  {s.op} at {s.where}" for s in self.found[:limit]]
        if len(self.found) > limit:
            lines.append(f"  ... and {len(self.found) - limit} more")
        return "\n".join(lines)


__all__ = ["HostSyncDetector", "HostSync", "READS_DEVICE"]
