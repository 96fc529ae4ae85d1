"""Quality against training steps for SFD and plain SiD (issue 15).

Every evaluation point reads two feature spaces: the embedded classifier's (what budgets and
presets are chosen by) and the independent LeNet's (``fid_network``; what quality is reported
in). Beside the curves: the teacher's values (its Heun sampler) and the real-data floor (real
training digits against the real held-out ones), so "within 1.3x of the teacher" is readable
off the same file.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..baselines.sid import plain_sid_state
from ..core.config import SFDConfig
from ..core.forget import ForgetSpec
from ..core.state import SFDState
from ..core.step import train_step
from .evaluate import teacher_sampler
from .fid import ClassifierFeatures, FeatureNetwork, fid_between
from .metrics import unlearning_metrics
from .quality import quality_of_images, real_class_variance

CURVE_METHODS = ("sfd", "sid")


@dataclass(frozen=True)
class CurveConfig:
    sfd: SFDConfig                          # SFD's config; plain SiD runs the same with no forgetting
    steps: int = 400                        # training iterations per method
    eval_at: tuple[int, ...] = (0, 25, 50, 100, 200, 400)  # steps at which G's EMA is evaluated (0 = initial G)
    methods: tuple[str, ...] = CURVE_METHODS
    per_class: int = 100                    # generated samples per class and evaluation
    teacher_steps: int = 18                 # Heun steps of the teacher row
    seed: int = 0                           # evaluation noise

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in CURVE_METHODS]
        if bad or not self.methods:
            raise ValueError(f"curve methods must be a non-empty subset of {CURVE_METHODS}, got {self.methods}")
        if self.steps < 1 or self.per_class < 2 or self.teacher_steps < 1:
            raise ValueError(f"need steps >= 1, per_class >= 2, teacher_steps >= 1; got steps={self.steps}, "
                             f"per_class={self.per_class}, teacher_steps={self.teacher_steps}")
        if not self.eval_at or any(s < 0 or s > self.steps for s in self.eval_at):
            raise ValueError(f"eval_at must list steps in [0, steps={self.steps}], got {self.eval_at}")


def _evaluate(sampler, spec: ForgetSpec, shape, spaces: dict[str, FeatureNetwork], classifier, real, cfg) -> dict:
    samples: dict = {}  # accuracy and quality read the same samples
    row = unlearning_metrics(sampler, classifier, spec, shape, per_class=cfg.per_class, seed=cfg.seed,
                             samples=samples)
    row.update(quality_of_images(samples["remain"], samples["remain_labels"], samples["forget"],
                                 samples["forget_labels"], spaces, *real))
    return row


def run_curve(teacher: nn.Module, classifier: nn.Module, independent: FeatureNetwork, real_test, real_train,
              cfg: CurveConfig, *, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """``real_test``/``real_train``: (images, labels) pairs of held-out and training digits in [-1, 1]."""
    spec = ForgetSpec.from_config(cfg.sfd, teacher.num_classes)
    teacher = teacher.eval().requires_grad_(False)
    shape = teacher.image_shape
    spaces = {"classifier": ClassifierFeatures(classifier), "independent": independent}
    remain = torch.tensor(spec.remain)
    floor, real_variance = {}, {}
    for key, features in spaces.items():
        a = real_train[0][torch.isin(real_train[1], remain)]
        b = real_test[0][torch.isin(real_test[1], remain)]
        floor[key] = {"fid": fid_between(a, b, features), "fid_features": features.name}
        real_variance[key] = real_class_variance(features, *real_test)
    t_sampler, t_nfe = teacher_sampler(teacher, cfg.teacher_steps)
    result = {"config": {**asdict(cfg), "sfd": cfg.sfd.to_dict()}, "forget": list(spec.forget),
              "override": None if spec.override is None else list(spec.override), "floor_real_train_vs_test": floor,
              "real_test_class_variance": real_variance,
              "teacher": {"nfe": t_nfe, **_evaluate(t_sampler, spec, shape, spaces, classifier, real_test, cfg)},
              "methods": {}}
    for method in cfg.methods:
        state = plain_sid_state(cfg.sfd, teacher) if method == "sid" else SFDState.create(cfg.sfd, teacher)
        points, seconds = [], 0.0
        for step in range(cfg.steps + 1):
            if step in cfg.eval_at:
                points.append({"step": step, "train_seconds": seconds,  # the EMA is always in eval mode
                               **_evaluate(state.generator_ema, spec, shape, spaces, classifier, real_test, cfg)})
            if step == cfg.steps:
                break
            start = time.perf_counter()
            train_step(state)
            seconds += time.perf_counter() - start
            if progress:
                progress(method, step + 1, cfg.steps)
        result["methods"][method] = {"points": points, "generator": state.generator_ema}
    return result


__all__ = ["CURVE_METHODS", "CurveConfig", "run_curve"]
