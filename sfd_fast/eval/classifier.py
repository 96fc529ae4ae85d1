"""The evaluation classifier: a small CNN that scores generated digits (SPEC section 5).

Its penultimate activations are the "classifier features" used for FID when no Inception
weights are supplied.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..io.atomic import load_tensors, save_tensors

CLASSIFIER_FILE = Path(__file__).resolve().parents[1] / "assets" / "classifier.safetensors"


class DigitClassifier(nn.Module):
    """conv(32) -> conv(64, /2) -> conv(128, /2) -> 4x4 pool -> fc(feature_dim) -> fc(classes).

    The 4x4 pooled grid keeps the layout of the strokes (a global pool scored ~91% on digits).
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.hparams = {"channels": channels, "num_classes": num_classes, "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(128 * 16, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim) of images in [-1, 1]."""
        return self.body(x.clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self(chunk).argmax(1) for chunk in x.split(batch_size)])

    def save(self, path: str | Path) -> None:
        save_tensors(self.state_dict(), path, {"kind": "digit_classifier", **self.hparams})

    @classmethod
    def load(cls, path: str | Path = CLASSIFIER_FILE, device: str | torch.device = "cpu") -> "DigitClassifier":
        tensors, meta = load_tensors(path)
        model = cls(meta["channels"], meta["num_classes"], meta["feature_dim"])
        model.load_state_dict(tensors)
        return model.to(device).eval()


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1/8 of the side: a classifier that tolerates off-centre samples."""
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 8, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True) -> DigitClassifier:
    """Train on (N, C, H, W) images in [-1, 1] with AdamW + cosine decay; returns it in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier(images.shape[1], int(labels.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc="classifier", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for idx in order.split(batch_size):
            loss = F.cross_entropy(model(_augment(images[idx], gen)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()
