"""The embedded default data set: a stratified MNIST subset shipped inside the package.

Only labels, image shape and evaluation references come from data: SFD itself is data-free.
The teacher and the evaluation classifier are trained on it (``sfd-fast pretrain-teacher``,
``sfd-fast train-classifier``). See assets/README.md for provenance and licence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MNIST_SUBSET = ASSETS / "mnist_subset.npz"
SPLITS = ("train", "test")
RESOLUTIONS = (8, 16, 32)


def load_embedded_mnist(split: str = "train", resolution: int = 16,
                        path: str | Path = MNIST_SUBSET) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] of shape (N, 1, resolution, resolution) and int64 labels (N,).

    28x28 digits are zero-padded to 32x32 (MNIST's own 4-pixel border grows to 6) and
    average-pooled to ``resolution``: an exact box filter, no interpolation choices.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution {resolution} is not supported; allowed: {RESOLUTIONS}")
    with np.load(path, allow_pickle=False) as data:
        images = torch.from_numpy(data[f"x_{split}"]).float().div(127.5).sub(1.0)
        labels = torch.from_numpy(data[f"y_{split}"].astype(np.int64))
    images = F.pad(images[:, None], (2, 2, 2, 2), value=-1.0)
    if resolution != 32:
        images = F.avg_pool2d(images, 32 // resolution)
    return images.contiguous(), labels
