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


def _shape(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def check_classifier_fits(classifier, image_shape, num_classes: int, classifier_name: str = "the classifier",
                          model_name: str = "the generator") -> None:
    """ValueError (one line) unless ``classifier`` scores ``image_shape`` images over ``num_classes`` classes.

    A classifier that records its resolution must match (C, H, W) exactly; one that does not (older
    files) must match the channels. Its classes must be the generator's classes.
    """
    image_shape = tuple(int(d) for d in image_shape)
    built = classifier.image_shape
    channels = classifier.hparams["channels"]
    hint = ("pass --classifier with one built for these images (a DigitClassifier .safetensors + its .json config, "
            "e.g. from `sfd-fast train-classifier`, which trains on the embedded 1xRxR digits)")
    if built is not None and tuple(built) != image_shape:
        raise ValueError(f"{model_name} makes {_shape(image_shape)} images but {classifier_name} was built for "
                         f"{_shape(built)}; {hint}")
    if built is None and channels != image_shape[0]:
        raise ValueError(f"{model_name} makes {_shape(image_shape)} images but {classifier_name} takes {channels}-channel "
                         f"images; {hint}")
    if classifier.hparams["num_classes"] != num_classes:
        raise ValueError(f"{classifier_name} predicts {classifier.hparams['num_classes']} classes but {model_name} has "
                         f"{num_classes}; {hint}")


def check_weights_finite(model: nn.Module, model_name: str) -> None:
    """ValueError (one line) if a weight of ``model`` is NaN/inf: its samples would be NaN and the
    classifier would still report accuracies for them (the argmax of NaN logits is class 0)."""
    tensors = [(name, t) for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_floating_point()]
    bad = [name for name, t in tensors if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"the weights of {model_name} are non-finite ({len(bad)} of {len(tensors)} tensors hold NaN/inf, "
                         f"first {bad[0]!r}); its samples would be NaN, so nothing was evaluated")


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
                     prefix: str = "", device: str | torch.device = "cpu", samples: dict | None = None) -> dict[str, float]:
    metrics = unlearning_metrics(sampler, classifier, spec, image_shape, per_class=per_class, seed=seed,
                                 device=device, prefix=prefix, samples=samples)
    metrics[prefix + "nfe"] = nfe
    return metrics


