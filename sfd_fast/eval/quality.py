"""Sample quality in a named feature space (issue 15): FID on the remaining classes against real
held-out digits, per-class feature variance (mode collapse shows as a smaller spread than the
teacher's), and the spread of the override samples (forget classes drawn as their override).

Variance is the total variance tr(Cov) of one class's features: a one-step generator that
collapses a class onto a few modes keeps its FID mean term small but loses this.
"""

from __future__ import annotations

import torch

from ..core.forget import ForgetSpec
from .fid import FeatureNetwork, feature_statistics, frechet_distance
from .metrics import Sampler, generate_per_class


def total_variance(features: torch.Tensor) -> float:
    """tr Cov of (N, D) features, in float64."""
    return float(feature_statistics(features)[1].trace())


@torch.no_grad()
def quality_metrics(sampler: Sampler, spec: ForgetSpec, image_shape: tuple[int, ...],
                    spaces: dict[str, FeatureNetwork], real_images: torch.Tensor, real_labels: torch.Tensor, *,
                    per_class: int, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, dict]:
    """Per feature space: FID on the remain classes, each remain class's feature variance, the forget classes' too.

    ``real_*``: held-out (N, C, H, W) images in [-1, 1] and labels; only the remain classes are
    compared. The noise is fixed by ``seed``, so two samplers see the same z per class; the
    images are drawn once and read by every space.
    """
    remain = list(spec.remain)
    images, labels = generate_per_class(sampler, remain, per_class, image_shape, seed=seed, device=device)
    images_f, labels_f = generate_per_class(sampler, list(spec.forget), per_class, image_shape, seed=seed + 1,
                                            device=device)
    return quality_of_images(images, labels, images_f, labels_f, spaces, real_images, real_labels)


def quality_of_images(images: torch.Tensor, labels: torch.Tensor, images_f: torch.Tensor, labels_f: torch.Tensor,
                      spaces: dict[str, FeatureNetwork], real_images: torch.Tensor,
                      real_labels: torch.Tensor) -> dict[str, dict]:
    """``quality_metrics`` of samples already drawn: remain-class ``images``/``labels``, forget-class ``images_f``."""
    remain = sorted(int(k) for k in labels.unique())
    keep = torch.isin(real_labels, torch.tensor(remain, device=real_labels.device))
    real = real_images[keep].to(images.device)
    out = {}
    for key, features in spaces.items():
        feats, feats_f = features(images), features(images_f)
        row = {"fid": frechet_distance(*feature_statistics(feats), *feature_statistics(features(real))),
               "fid_features": features.name,
               "class_variance": {str(k): total_variance(feats[labels == k]) for k in remain},
               "forget_variance": {str(int(k)): total_variance(feats_f[labels_f == k]) for k in labels_f.unique()}}
        row["mean_class_variance"] = sum(row["class_variance"].values()) / len(remain)
        out[key] = row
    return out


def real_class_variance(features: FeatureNetwork, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Each class's feature variance in real data (the spread a faithful generator should keep)."""
    feats = features(images)
    return {str(int(k)): total_variance(feats[labels == k]) for k in labels.unique()}


__all__ = ["total_variance", "quality_metrics", "quality_of_images", "real_class_variance"]
