"""The one place where the training step picks an implementation of the loss math.

``backend`` is "auto" | "torch" | "triton" | "cuda" (also read from $SFD_FAST_BACKEND when the
caller passes None). Today only "torch", the reference in ``sfd_fast.losses``, is wired; the
fused kernels register here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from . import losses

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "triton", "cuda")


@dataclass(frozen=True)
class LossFunctions:
    """The loss implementations one backend provides (same signatures as ``sfd_fast.losses``)."""

    name: str
    sid_generator_loss: Callable
    edm_denoising_loss: Callable


REFERENCE = LossFunctions("torch", losses.sid_generator_loss, losses.edm_denoising_loss)


def resolve_backend(backend: str | None = None, device=None) -> LossFunctions:
    """Loss functions for ``backend`` on ``device``; "auto" falls back to the reference, logged."""
    backend = backend or os.environ.get("SFD_FAST_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {BACKENDS}")
    if backend == "torch":
        return REFERENCE
    if backend == "auto":
        return REFERENCE
    raise RuntimeError(f"backend {backend!r} is not available in this build; allowed here: ('auto', 'torch')")
