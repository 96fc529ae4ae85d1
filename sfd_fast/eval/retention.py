"""Retention (model integrity, SPEC section 4): how far an unlearned model drifts on what it should keep.

retention = mean over remaining classes c_r and noises z of d(original(z, c_r), unlearned(z, c_r)),
with d an LPIPS-style perceptual distance computed in the evaluation classifier's feature space:
every activation of its convolutional body (the outputs of its SiLU layers, including the
penultimate features) is unit-normalised over channels, squared differences are averaged over
positions, and the layers are summed with equal weight (LPIPS without learned layer weights,
because no offline perceptual network for 16x16 digits exists). 0 means identical images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import Sampler, generate_per_class

FEATURE_NETWORK = "multi-layer classifier features (LPIPS-style, unweighted)"


def classifier_activations(classifier: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every SiLU of ``classifier.body`` for images in [-1, 1]: a list of (N, C_l, ...)."""
    x = images.clamp(-1, 1)
    acts = []
    for layer in classifier.body:
        x = layer(x)
        if isinstance(layer, nn.SiLU):
            acts.append(x)
    if not acts:
        raise ValueError(f"{type(classifier).__name__}.body has no SiLU layers to take perceptual features from")
    return acts


@torch.no_grad()
def perceptual_distance(images_a: torch.Tensor, images_b: torch.Tensor, classifier: nn.Module,
                        batch_size: int = 500) -> torch.Tensor:
    """Per-pair distance (N,) between images_a[i] and images_b[i] (both (N, C, H, W) in [-1, 1])."""
    if images_a.shape != images_b.shape:
        raise ValueError(f"image sets differ in shape: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    out = []
    for a, b in zip(images_a.split(batch_size), images_b.split(batch_size)):
        total = torch.zeros(len(a), device=a.device)
        for fa, fb in zip(classifier_activations(classifier, a), classifier_activations(classifier, b)):
            fa, fb = F.normalize(fa, dim=1, eps=1e-10), F.normalize(fb, dim=1, eps=1e-10)
            total += (fa - fb).square().sum(1).reshape(len(a), -1).mean(1)  # mean over positions, if any
        out.append(total)
    return torch.cat(out)


@torch.no_grad()
def retention_distance(original: Sampler, unlearned: Sampler, classifier: nn.Module, classes: list[int],
                       image_shape: tuple[int, ...], *, per_class: int, seed: int = 0,
                       device: torch.device | str = "cpu") -> float:
    """Mean perceptual distance between the two samplers' images for the same z and remaining class."""
    images_a, _ = generate_per_class(original, classes, per_class, image_shape, seed=seed, device=device)
    images_b, _ = generate_per_class(unlearned, classes, per_class, image_shape, seed=seed, device=device)
    return perceptual_distance(images_a, images_b, classifier).mean().item()


__all__ = ["FEATURE_NETWORK", "classifier_activations", "perceptual_distance", "retention_distance"]
