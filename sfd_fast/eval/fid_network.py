"""The FID feature network that nothing in this project was trained, tuned or selected on (issue 15).

The embedded DigitClassifier steers the project: remain accuracy, classifier-features FID and
retention are what presets and budgets were chosen by. A quality figure read in the network it
was tuned on is circular, so quality is reported in a second network of another design:
LeNet-5-style (5x5 convolutions, max pooling, ReLU; DigitClassifier has 3x3 strided
convolutions, SiLU and average pooling), 256 features, trained on the real training digits
alone, without augmentation, with its own seed. It is read only when reporting.

Made by ``sfd-fast train-fid-network --out sfd_fast/assets/fid_lenet.safetensors`` (assets/README.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..io.atomic import CheckpointError, load_tensors, save_tensors
from .classifier import FeatureClassifier, train_classifier
from .fid import ClassifierFeatures

FID_NETWORK_FILE = Path(__file__).resolve().parents[1] / "assets" / "fid_lenet.safetensors"
FID_NETWORK_NAME = "independent LeNet features"
FID_NETWORK_SHAPE = (1, 16, 16)  # the images the embedded one was trained on (C, H, W)
KIND = "lenet_fid_features"


class LeNetFeatures(FeatureClassifier):
    """conv5(32) -> maxpool -> conv5(64) -> maxpool -> fc(256) -> fc(classes), ReLU throughout."""

    def __init__(self, channels: int = 1, num_classes: int = 10, resolution: int = 16, feature_dim: int = 256):
        super().__init__()
        self.hparams = {"channels": channels, "num_classes": num_classes, "resolution": resolution,
                        "feature_dim": feature_dim}
        side = resolution // 4  # two 2x2 max pools
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * side * side, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) activations of images in [-1, 1] at the trained resolution."""
        side = self.hparams["resolution"]
        if tuple(x.shape[-2:]) != (side, side):
            raise ValueError(f"the FID network was trained on {side}x{side} images, got {tuple(x.shape[-2:])}")
        return super().features(x)

    def save(self, path: str | Path) -> None:
        save_tensors(self.state_dict(), path, {"kind": KIND, **self.hparams})

    @classmethod
    def load(cls, path: str | Path = FID_NETWORK_FILE, device: str | torch.device = "cpu") -> "LeNetFeatures":
        tensors, meta = load_tensors(path)
        if meta.get("kind") != KIND:
            raise CheckpointError(f"{str(path)!r} is not a LeNet FID network (metadata kind {meta.get('kind')!r}, "
                                  f"expected {KIND!r}); make one with `sfd-fast train-fid-network`")
        model = cls(**{k: int(meta[k]) for k in ("channels", "num_classes", "resolution", "feature_dim")})
        model.load_state_dict(tensors)
        return model.to(device).eval()


def independent_features(path: str | Path = FID_NETWORK_FILE, device: str | torch.device = "cpu") -> ClassifierFeatures:
    """The FeatureNetwork quality is reported in: the LeNet's 256 penultimate features, named as such."""
    return ClassifierFeatures(LeNetFeatures.load(path, device), name=FID_NETWORK_NAME)


def train_fid_network(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 6, seed: int = 1,
                      progress: bool = True) -> LeNetFeatures:
    """Train on real (N, C, H, W) digits in [-1, 1], no augmentation (seed 1: the classifier used 0)."""
    model = LeNetFeatures(images.shape[1], int(labels.max()) + 1, images.shape[-1])
    return train_classifier(images, labels, epochs=epochs, seed=seed, progress=progress, model=model,
                            augment=False, desc="fid network")


__all__ = ["FID_NETWORK_FILE", "FID_NETWORK_NAME", "FID_NETWORK_SHAPE", "LeNetFeatures", "independent_features", "train_fid_network"]
