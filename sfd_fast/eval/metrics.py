"""Did forgetting work? Classifier-based metrics of SPEC section 5, for any sampler.

A *sampler* here is any callable ``(z, labels) -> images in [-1, 1]``: the one-step generator,
or the teacher's Heun sampler wrapped with ``functools.partial``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core.forget import ForgetSpec

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def forget_accuracy(pred: torch.Tensor, forget_labels: torch.Tensor) -> float:
    """Share of forget-class generations the classifier still labels as that class (lower is better)."""
    return (pred == forget_labels).float().mean().item()


def override_rate(pred: torch.Tensor, override_labels: torch.Tensor) -> float:
    """Share of forget-class generations labelled as their override class (the intended target)."""
    return (pred == override_labels).float().mean().item()


def remain_accuracy(pred: torch.Tensor, remain_labels: torch.Tensor) -> float:
    """Share of remaining-class generations labelled as the class they were asked for."""
    return (pred == remain_labels).float().mean().item()


@torch.no_grad()
def generate_per_class(sampler: Sampler, classes: list[int], per_class: int, image_shape: tuple[int, ...], *,
                       seed: int = 0, batch_size: int = 250, device: torch.device | str = "cpu"):
    """(images, labels) with ``per_class`` samples of every class, from fixed-seed noise.

    The noise depends only on (seed, position), so two samplers see identical z per class.
    """
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class)
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn((len(labels), *image_shape), generator=gen, device=device)
    images = torch.cat([sampler(zb, cb) for zb, cb in zip(z.split(batch_size), labels.split(batch_size))])
    return images, labels


@torch.no_grad()
def unlearning_metrics(sampler: Sampler, classifier, spec: ForgetSpec, image_shape: tuple[int, ...], *,
                       per_class: int = 100, seed: int = 0, device: torch.device | str = "cpu",
                       prefix: str = "", samples: dict | None = None) -> dict[str, float]:
    """forget/unlearning/override/remain accuracy of ``sampler`` judged by ``classifier``.

    ``samples``: a dict that receives the images it drew (keys forget, forget_labels, remain,
    remain_labels), for metrics read off the same samples (``quality.quality_of_images``).
    """
    out: dict[str, float] = {}
    images_f, labels_f = generate_per_class(sampler, list(spec.forget), per_class, image_shape,
                                            seed=seed, device=device)
    pred_f = classifier.predict(images_f)
    out[prefix + "forget_accuracy"] = forget_accuracy(pred_f, labels_f)
    out[prefix + "unlearning_accuracy"] = 1.0 - out[prefix + "forget_accuracy"]
    if spec.override is not None:
        table = torch.full((spec.num_classes,), -1, dtype=torch.long, device=labels_f.device)
        table[list(spec.forget)] = torch.tensor(spec.override, device=labels_f.device)
        out[prefix + "override_rate"] = override_rate(pred_f, table[labels_f])
    else:  # random override: any remaining class counts as a safe outcome
        remain = torch.tensor(spec.remain, device=pred_f.device)
        out[prefix + "override_rate"] = torch.isin(pred_f, remain).float().mean().item()
    images_r, labels_r = generate_per_class(sampler, list(spec.remain), per_class, image_shape,
                                            seed=seed + 1, device=device)
    out[prefix + "remain_accuracy"] = remain_accuracy(classifier.predict(images_r), labels_r)
    if samples is not None:
        samples.update(forget=images_f, forget_labels=labels_f, remain=images_r, remain_labels=labels_r)
    return out
