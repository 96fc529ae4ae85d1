"""The evaluation classifier: a small CNN that scores generated digits (SPEC section 5).

Its penultimate activations are the "classifier features" used for FID when no Inception
weights are supplied.

On disk: ``name.safetensors`` (weights; its metadata also holds the config) and ``name.json``
beside it, the config a user edits or writes for their own classifier: channels, num_classes,
feature_dim and resolution, i.e. the images (channels, resolution, resolution) it was built for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..io.atomic import CheckpointError, load_tensors, save_tensors, write_json

CLASSIFIER_FILE = Path(__file__).resolve().parents[1] / "assets" / "classifier.safetensors"
# The embedded file predates the recorded resolution; it was trained on the 16x16 digits (assets/README.md).
EMBEDDED_RESOLUTION = 16
CONFIG_FIELDS = ("channels", "num_classes", "feature_dim", "resolution")


def config_path(path: str | Path) -> Path:
    """The JSON config beside a classifier's weights: clf.safetensors -> clf.json."""
    return Path(path).with_suffix(".json")


class FeatureClassifier(nn.Module):
    """``body`` (images -> features) then ``head`` (features -> logits); subclasses build both."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim) of images in [-1, 1]."""
        return self.body(x.clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self(chunk).argmax(1) for chunk in x.split(batch_size)])


class DigitClassifier(FeatureClassifier):
    """conv(32) -> conv(64, /2) -> conv(128, /2) -> 4x4 pool -> fc(feature_dim) -> fc(classes).

    The 4x4 pooled grid keeps the layout of the strokes (a global pool scored ~91% on digits).
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, feature_dim: int = 128, resolution: int | None = None):
        super().__init__()
        # resolution: the image side it was trained on (None: not recorded; the network itself takes any side)
        self.hparams = {"channels": channels, "num_classes": num_classes, "feature_dim": feature_dim,
                        "resolution": resolution}
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(128 * 16, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of the images it was built for, or None when its resolution was not recorded."""
        r = self.hparams["resolution"]
        return None if r is None else (self.hparams["channels"], r, r)

    def save(self, path: str | Path) -> None:
        """Weights (safetensors, config in its metadata) and the JSON config beside them."""
        save_tensors(self.state_dict(), path, {"kind": "digit_classifier", **self.hparams})
        write_json(self.hparams, config_path(path))

    @classmethod
    def load(cls, path: str | Path = CLASSIFIER_FILE, device: str | torch.device = "cpu") -> "DigitClassifier":
        """Weights from ``path``; the config from the JSON beside it if there is one, else the file's metadata.

        Raises CheckpointError (one line, naming the file) for a missing file, a bad config or weights
        that do not fit the config.
        """
        path = Path(path)
        tensors, meta = load_tensors(path)
        json_file = config_path(path)
        if json_file.is_file():
            try:
                meta = json.loads(json_file.read_text())
            except ValueError as exc:
                raise CheckpointError(f"classifier config {str(json_file)!r} is not valid JSON: {exc}") from None
            where = str(json_file)
        else:
            where = f"the metadata of {str(path)!r}"
        config = _classifier_config(meta, where)
        if config["resolution"] is None and path.resolve() == CLASSIFIER_FILE.resolve():
            config["resolution"] = EMBEDDED_RESOLUTION
        model = cls(**config)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"the weights in {str(path)!r} do not fit its config {config} "
                                  f"(a DigitClassifier): {first}") from None
        return model.to(device).eval()


def _classifier_config(meta: dict, where: str) -> dict:
    """The DigitClassifier fields of a config dict, each a positive integer (resolution may be absent)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"classifier config in {where} must be a JSON object with {list(CONFIG_FIELDS)}")
    unknown = set(meta) - set(CONFIG_FIELDS) - {"kind"}
    if unknown:
        raise CheckpointError(f"classifier config in {where} has unknown field(s) {sorted(unknown)}; "
                              f"allowed: {list(CONFIG_FIELDS)}")
    config = {}
    for name in CONFIG_FIELDS:
        value = meta.get(name)
        if value is None and name == "resolution":
            config[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"classifier config in {where}: {name!r} must be a positive integer, got {value!r}")
        config[name] = value
    return config


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1/8 of the side: a classifier that tolerates off-centre samples."""
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 8, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True, model: nn.Module | None = None,
                     augment: bool = True, desc: str = "classifier") -> nn.Module:
    """Train on (N, C, H, W) images in [-1, 1] with AdamW + one-cycle decay; returns it in eval mode.

    ``model``: any module mapping images to logits (default: a new DigitClassifier for these images).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if model is None:
        model = DigitClassifier(images.shape[1], int(labels.max()) + 1, resolution=images.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for idx in order.split(batch_size):
            x = _augment(images[idx], gen) if augment else images[idx]
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()
