"""The one place where the training step picks an implementation of the loss math.

``backend`` is "auto" | "torch" | "triton" | "cuda" (also read from $SFD_FAST_BACKEND when the
caller passes None):
- "torch": the reference in ``sfd_fast.core.losses``.
- "triton": ``sfd_fast.kernels``; needs triton importable and CUDA tensors, or CPU tensors with
  TRITON_INTERPRET=1 set before the kernels were imported (the interpreter: tests only).
- "cuda": the C++/CUDA extension through ``sfd_fast.core.cuda_ext`` (``available() -> (ok, why)``).
- "auto": on a CUDA device the CUDA extension if it loads, else Triton, else the reference; on
  other devices the reference. Each fallback is logged once with its reason, never silent.
An explicitly requested backend that cannot run raises ``BackendUnavailable`` (a RuntimeError) saying why.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import losses

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "triton", "cuda")


@dataclass(frozen=True)
class LossFunctions:
    """The loss implementations one backend provides (same signatures as ``sfd_fast.core.losses``)."""

    name: str
    sid_generator_loss: Callable
    edm_denoising_loss: Callable


REFERENCE = LossFunctions("torch", losses.sid_generator_loss, losses.edm_denoising_loss)
_logged: set[str] = set()


def _log_once(message: str, level: int = logging.WARNING) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def _triton(device: torch.device) -> tuple[LossFunctions | None, str]:
    """(Triton losses, "") when they can run on ``device``, else (None, the reason)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton is not importable ({exc}); install sfd_fast[triton]"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, f"Triton needs a CUDA device (got {device}), or TRITON_INTERPRET=1 for CPU tensors"
    try:
        kernels = importlib.import_module("sfd_fast.kernels")
    except Exception as exc:  # a broken triton install fails at import in many ways
        return None, f"sfd_fast.kernels failed to import: {type(exc).__name__}: {exc}"
    if device.type != "cuda" and not kernels.INTERPRETED:
        return None, ("sfd_fast.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels "
                      "cannot run on CPU; set it before the first import")
    return LossFunctions("triton", kernels.sid_generator_loss, kernels.edm_denoising_loss), ""


def _cuda(device: torch.device) -> tuple[LossFunctions | None, str]:
    """(CUDA-extension losses, "") when the extension loads and ``device`` is CUDA, else (None, why)."""
    if device.type != "cuda":
        return None, f"the CUDA extension needs a CUDA device (got {device})"
    try:
        ext = importlib.import_module("sfd_fast.core.cuda_ext")
    except Exception as exc:
        return None, f"sfd_fast.core.cuda_ext is not importable: {type(exc).__name__}: {exc}"
    ok, why = ext.available()
    if not ok:
        return None, f"the CUDA extension is not available: {why}"
    return LossFunctions("cuda", ext.sid_generator_loss, ext.edm_denoising_loss), ""


class BackendUnavailable(RuntimeError):
    """An explicitly requested loss backend cannot run here (the message says why)."""


def resolve_backend(backend: str | None = None, device=None) -> LossFunctions:
    """Loss functions for ``backend`` on ``device`` (torch.device, str or None = CPU)."""
    backend = backend or os.environ.get("SFD_FAST_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {BACKENDS}")
    device = torch.device(device if device is not None else "cpu")
    if backend == "torch":
        return REFERENCE
    if backend in ("triton", "cuda"):
        fns, why = (_triton if backend == "triton" else _cuda)(device)
        if fns is None:
            raise BackendUnavailable(f"backend {backend!r} was requested but cannot run: {why}")
        return fns
    # auto
    if device.type != "cuda":
        # The kernels are for GPUs (the Triton interpreter is a test tool, far slower than eager).
        _log_once(f"sfd_fast backend auto: torch reference on {device.type} (fused kernels need CUDA)", logging.INFO)
        return REFERENCE
    reasons = []
    for probe in (_cuda, _triton):
        fns, why = probe(device)
        if fns is not None:
            if reasons:
                _log_once(f"sfd_fast backend auto: using {fns.name} ({'; '.join(reasons)})")
            return fns
        reasons.append(why)
    _log_once(f"sfd_fast backend auto: falling back to the torch reference ({'; '.join(reasons)})")
    return REFERENCE
