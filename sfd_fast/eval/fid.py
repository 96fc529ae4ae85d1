"""Fréchet distance between generated and real images in a *named* feature space (SPEC section 5).

Feature networks, and the name of the one used travels with every number:
- ``ClassifierFeatures``: the embedded DigitClassifier's penultimate activations. Reported as
  "FID (classifier features)": in-domain and offline, but not comparable with published FIDs.
  The same wrapper reads the independent LeNet of ``fid_network`` ("independent LeNet features"),
  the network quality claims are made in because nothing was tuned or selected on it.
- ``OnnxFeatures``: any feature network the user supplies as a local ONNX file (for example an
  Inception-v3 pool3 export), run with onnxruntime. No download, no pickle; torchvision is not a
  dependency, so Inception arrives as ONNX rather than as a state dict.

The matrix square root uses a symmetric eigendecomposition in float64, so SciPy is not needed:
tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), and the inner matrix is symmetric PSD.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from .metrics import Sampler, generate_per_class


class FeatureNetwork(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] -> (N, D) features."""


class ClassifierFeatures:
    """Penultimate features of a network with a ``features(x)`` method (DigitClassifier, LeNetFeatures)."""

    def __init__(self, classifier, batch_size: int = 500, name: str = "classifier features"):
        self.classifier = classifier
        self.batch_size = batch_size
        self.name = name

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(x).float() for x in images.split(self.batch_size)])


class OnnxFeatures:
    """A local ONNX feature network (e.g. Inception-v3 up to pool3), run on onnxruntime's CPU provider.

    Images are mapped from [-1, 1] to the network's input: grey is repeated to its channel count
    and the side is resized bilinearly to its fixed input size (299 for Inception). ``value_range``
    is the range the network expects ((-1, 1) for pytorch-fid's export, (0, 1) for others).
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), batch_size: int = 50):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature network file {str(path)!r} does not exist (give a local .onnx file)")
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or not all(isinstance(d, int) for d in inp.shape[1:]):
            raise ValueError(f"{str(path)!r}: input {inp.name!r} has shape {inp.shape}; expected (N, C, H, W) "
                             "with fixed C, H, W")
        self.input_name, (self.channels, self.height, self.width) = inp.name, inp.shape[1:]
        self.name = name or f"{path.stem} (ONNX)"
        self.value_range = value_range
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        lo, hi = self.value_range
        for x in images.float().cpu().split(self.batch_size):
            if x.shape[1] != self.channels:
                if x.shape[1] != 1:
                    raise ValueError(f"images have {x.shape[1]} channels; the network takes {self.channels}")
                x = x.expand(-1, self.channels, -1, -1)
            if x.shape[-2:] != (self.height, self.width):
                x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False)
            x = (x.clamp(-1, 1) + 1) / 2 * (hi - lo) + lo
            feats = self.session.run(None, {self.input_name: x.contiguous().numpy()})[0]
            out.append(torch.from_numpy(feats).reshape(len(x), -1))
        return torch.cat(out).float()


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(features.shape)}")
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) for Gaussians fitted to two feature sets."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics do not match: means {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"covariances {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}")
    root1 = _sqrt_psd(sigma1.double())
    inner = root1 @ sigma2.double() @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).double().square().sum() + sigma1.double().trace() + sigma2.double().trace() - 2 * tr_covmean
    return max(float(value), 0.0)


def fid_between(images_a: torch.Tensor, images_b: torch.Tensor, features: FeatureNetwork) -> float:
    """Fréchet distance between two image sets (N, C, H, W) in the given feature space."""
    return frechet_distance(*feature_statistics(features(images_a)), *feature_statistics(features(images_b)))


def fid_of_sampler(sampler: Sampler, real_images: torch.Tensor, real_labels: torch.Tensor, classes: list[int],
                   features: FeatureNetwork, *, per_class: int, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, float | str]:
    """FID of ``sampler`` on ``classes`` against the real images of those classes.

    Generates ``per_class`` images of each class from fixed-seed noise. Returns
    ``{"fid": value, "fid_features": name}`` so the feature space is never lost.
    """
    keep = torch.isin(real_labels, torch.tensor(classes, device=real_labels.device))
    real = real_images[keep]
    fake, _ = generate_per_class(sampler, classes, per_class, tuple(real_images.shape[1:]), seed=seed, device=device)
    return {"fid": fid_between(fake, real.to(fake.device), features), "fid_features": features.name}


__all__ = ["FeatureNetwork", "ClassifierFeatures", "OnnxFeatures", "feature_statistics", "frechet_distance",
           "fid_between", "fid_of_sampler"]
