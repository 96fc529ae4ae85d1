"""Known-answer models for the evaluation tests: a small real classifier, and a generator whose
output class is set by its class-embedding table (so a class can be hidden in the table only)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from sfd_fast.eval.classifier import DigitClassifier
from sfd_fast.io.data import load_embedded_mnist

RESOLUTION = 8


@functools.lru_cache(maxsize=2)
def real_digits(split: str = "train"):
    return load_embedded_mnist(split, RESOLUTION)


@functools.lru_cache(maxsize=1)
def small_classifier() -> DigitClassifier:
    """A DigitClassifier trained for 120 Adam steps on embedded 8x8 digits (~85% test accuracy).

    No shift augmentation (train_classifier's default): at 8x8 a 1-pixel shift is large and the
    short budget then stalls near 50%.
    """
    images, labels = real_digits()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = DigitClassifier(1, 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        idx = torch.randint(len(images), (128,), generator=gen)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


class PrototypeGenerator(nn.Module):
    """G(z, c) = sum_k softmax(scale * <emb(c), key_k>) * mean_image_k + noise_scale * z.

    c is labels (B,) (looked up in ``table``) or embeddings (B, E). With table = keys, class k
    renders digit k; ``hide(f, o)`` overwrites row f with key o: asked for f it draws o, yet the
    digit f is still one embedding away — the model an embedding attack should break.
    """

    def __init__(self, prototypes: torch.Tensor, scale: float = 4.0, noise_scale: float = 0.05):
        super().__init__()
        k = prototypes.shape[0]
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("keys", torch.eye(k))
        self.register_buffer("table", torch.eye(k))
        self.scale, self.noise_scale = scale, noise_scale
        self.image_shape = tuple(prototypes.shape[1:])

    def hide(self, forget: int, override: int) -> "PrototypeGenerator":
        self.table[forget] = self.keys[override]
        return self

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        emb = c if c.is_floating_point() else self.table[c]
        weights = F.softmax(self.scale * emb @ self.keys.T, dim=1)
        return torch.einsum("bk,kchw->bchw", weights, self.prototypes) + self.noise_scale * z


def prototype_generator() -> PrototypeGenerator:
    images, labels = real_digits()
    means = torch.stack([images[labels == k].mean(0) for k in range(10)])
    # Stretch the blurry class means back to the data's contrast so they read as digits.
    return PrototypeGenerator((means * 1.5).clamp(-1, 1))
