"""Evaluate a one-step generator or a teacher sampler: metrics JSON + per-class PNG grid."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from ..core.forget import ForgetSpec
from ..io.images import save_grid
from ..models.sampler import edm_heun_sample, heun_nfe
from .metrics import generate_per_class, unlearning_metrics


def teacher_sampler(teacher: nn.Module, num_steps: int):
    """The teacher as a ``(z, labels) -> images`` sampler, and its NFE per image."""
    return functools.partial(edm_heun_sample, teacher, num_steps=num_steps), heun_nfe(num_steps)


@torch.no_grad()
def class_grid(sampler, num_classes: int, per_row: int, image_shape, path: str | Path, seed: int = 1234,
               device: str | torch.device = "cpu") -> Path:
    """One row per class, ``per_row`` samples each, from fixed noise (comparable across samplers)."""
    images, _ = generate_per_class(sampler, list(range(num_classes)), per_row, image_shape, seed=seed, device=device)
    return save_grid(images, per_row, path, scale=3)


def evaluate_sampler(sampler, nfe: int, classifier, spec: ForgetSpec, image_shape, *, per_class: int, seed: int,
                     prefix: str = "", device: str | torch.device = "cpu") -> dict[str, float]:
    metrics = unlearning_metrics(sampler, classifier, spec, image_shape, per_class=per_class, seed=seed,
                                 device=device, prefix=prefix)
    metrics[prefix + "nfe"] = nfe
    return metrics


