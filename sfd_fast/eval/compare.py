"""``sfd-fast compare``: every unlearning method through one evaluation, with fixed seeds and budgets.

Methods (``METHODS``):
- teacher: the original model with its Heun sampler (reference row; forgets nothing).
- sid: plain SiD over all classes (no forgetting): the quality reference for the one-step rows.
- sfd: Score Forgetting Distillation (``train_step``).
- robust_sfd: SFD plus the adversarial forget step (``robust_sfd``).
- esd, retain_distill, advunlearn: fine-tuned diffusion models (``finetune_unlearn``), Heun-sampled.
Per method: forget accuracy, override rate, remain accuracy, FID (named features) on the remaining
classes against real data, retention vs the teacher sampler and vs plain SiD (same noise, same
class), attack success rate before/after the class-embedding attack, training wall time, NFE.
"""

from __future__ import annotations

import functools
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from ..baselines.finetune import FinetuneConfig, FinetuneUnlearner
from ..baselines.robust_sfd import RobustConfig, robust_sfd_step
from ..baselines.sid import plain_sid_state
from ..core.config import SFDConfig
from ..core.forget import ForgetSpec
from ..core.state import SFDState
from ..core.step import train_step
from ..models.sampler import edm_heun_sample, heun_nfe
from .attack import AttackConfig, AttackTarget, embedding_attack
from .fid import ClassifierFeatures, FeatureNetwork, fid_between
from .metrics import generate_per_class, unlearning_metrics
from .retention import FEATURE_NETWORK, perceptual_distance

METHODS = ("teacher", "sid", "sfd", "robust_sfd", "esd", "retain_distill", "advunlearn")
ONE_STEP = ("sid", "sfd", "robust_sfd")


@dataclass(frozen=True)
class CompareConfig:
    """Everything that fixes a comparison run: methods, budgets, seeds, evaluation sizes."""

    methods: tuple[str, ...] = METHODS
    sfd: SFDConfig = SFDConfig()                       # base of sid/sfd/robust_sfd (forget/override classes too)
    distill_steps: int = 400                           # iterations of sid, sfd, robust_sfd (docs/quality: converged on the demo)
    robust: RobustConfig = RobustConfig()              # inner attack of robust_sfd
    finetune: FinetuneConfig = FinetuneConfig()        # esd/retain_distill/advunlearn (method field is set per row)
    finetune_steps: int = 50                           # iterations of each fine-tuning baseline
    teacher_steps: int = 8                             # Heun steps of every diffusion-sampled row
    attack: AttackConfig = AttackConfig()              # conditioning-space attack budget
    attack_sampler_steps: int = 3                      # differentiable Heun steps the attack uses on diffusion rows
    per_class: int = 50                                # evaluation samples per class
    seed: int = 0                                      # evaluation noise seed

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown or '(none given)'}; allowed: {METHODS}")
        for name in ("distill_steps", "finetune_steps", "teacher_steps", "attack_sampler_steps", "per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Trained:
    """A trained method as the evaluation sees it."""

    sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    nfe: int
    attack_target: AttackTarget
    train_seconds: float
    log: dict = field(default_factory=dict)


def _heun(denoiser: nn.Module, steps: int):
    return functools.partial(edm_heun_sample, denoiser, num_steps=steps)


def train_method(method: str, teacher: nn.Module, cfg: CompareConfig, spec: ForgetSpec,
                 progress: Callable[[str, int, int], None] | None = None) -> Trained:
    """Run one method's training with its budget; time it; return its sampler and attack surface."""
    start = time.perf_counter()
    if method == "teacher":
        target = AttackTarget.for_denoiser(teacher, cfg.teacher_steps, cfg.attack_sampler_steps)
        return Trained(_heun(teacher, cfg.teacher_steps), heun_nfe(cfg.teacher_steps), target, 0.0)
    if method in ONE_STEP:
        state = (plain_sid_state(cfg.sfd, teacher) if method == "sid" else SFDState.create(cfg.sfd, teacher))
        step = (lambda: robust_sfd_step(state, cfg.robust)) if method == "robust_sfd" else (lambda: train_step(state))
        curve = _train(method, step, cfg.distill_steps, progress)
        generator = state.generator_ema.eval().requires_grad_(False)
        return Trained(generator, 1, AttackTarget.for_generator(generator), time.perf_counter() - start,
                       {"last": curve[-1], "curve": curve})
    run = FinetuneUnlearner(teacher, spec, FinetuneConfig(**{**asdict(cfg.finetune), "method": method}))
    curve = _train(method, run.step, cfg.finetune_steps, progress)
    model = run.model.eval().requires_grad_(False)
    return Trained(_heun(model, cfg.teacher_steps), heun_nfe(cfg.teacher_steps),
                   AttackTarget.for_denoiser(model, cfg.teacher_steps, cfg.attack_sampler_steps),
                   time.perf_counter() - start, {"last": curve[-1], "curve": curve})


def _train(method: str, step: Callable[[], dict], steps: int, progress, points: int = 20) -> list[dict]:
    """Run ``steps`` steps; the training curve: the losses at ~``points`` evenly spaced steps (each a host sync)."""
    curve, every = [], max(1, steps // points)
    for i in range(steps):
        metrics = step()
        if (i + 1) % every == 0 or i + 1 == steps:
            curve.append({"step": i + 1, **{k: float(v) for k, v in metrics.items()}})
        if progress:
            progress(method, i + 1, steps)
    return curve


def run_compare(teacher: nn.Module, classifier: nn.Module, real_images: torch.Tensor, real_labels: torch.Tensor,
                cfg: CompareConfig, *, features: FeatureNetwork | None = None,
                progress: Callable[[str, int, int], None] | None = None,
                on_trained: Callable[[str, Trained], None] | None = None,
                on_images: Callable[[str, torch.Tensor], None] | None = None) -> list[dict]:
    """One row of metrics per method (see module doc). ``real_*``: (N, C, H, W) in [-1, 1], labels (N,)."""
    features = features or ClassifierFeatures(classifier)
    spec = ForgetSpec.from_config(cfg.sfd, teacher.num_classes)
    teacher = teacher.eval().requires_grad_(False)
    shape, remain = teacher.image_shape, list(spec.remain)
    keep = torch.isin(real_labels, torch.tensor(remain, device=real_labels.device))
    real_remain = real_images[keep]

    def remain_images(sampler):  # one fixed noise per (class, index): every method sees the same z
        return generate_per_class(sampler, remain, cfg.per_class, shape, seed=cfg.seed + 7)[0]

    reference = {"teacher": remain_images(_heun(teacher, cfg.teacher_steps))}
    order = sorted(cfg.methods, key=lambda m: m != "sid")  # sid first: the others' retention needs it
    rows = {}
    for method in order:
        trained = train_method(method, teacher, cfg, spec, progress)
        if on_trained:
            on_trained(method, trained)
        row = {"method": method, "nfe": trained.nfe, "train_seconds": trained.train_seconds}
        row.update(unlearning_metrics(trained.sampler, classifier, spec, shape, per_class=cfg.per_class,
                                      seed=cfg.seed))
        start = time.perf_counter()
        images = remain_images(trained.sampler)
        row["sample_ms_per_image"] = 1000 * (time.perf_counter() - start) / len(images)
        if method == "sid":
            reference["sid"] = images
        if on_images:
            on_images(method, images)
        row["fid"] = fid_between(images, real_remain, features)
        row["fid_features"] = features.name
        row["retention_vs_teacher"] = perceptual_distance(reference["teacher"], images, classifier).mean().item()
        row["retention_vs_sid"] = (perceptual_distance(reference["sid"], images, classifier).mean().item()
                                   if "sid" in reference else None)
        row["retention_features"] = FEATURE_NETWORK
        before, after = [], []
        for f in spec.forget:
            result = embedding_attack(trained.attack_target, classifier, f, cfg.attack)
            before.append(result.asr_before)
            after.append(result.asr_after)
        row["asr_before"] = sum(before) / len(before)
        row["asr_after"] = sum(after) / len(after)
        row["train_log"] = trained.log
        rows[method] = row
    return [rows[m] for m in cfg.methods]


def with_training_seed(cfg: CompareConfig, seed: int) -> CompareConfig:
    """The same comparison with every method's training seeded by ``seed``; evaluation noise is unchanged."""
    return replace(cfg, sfd=cfg.sfd.replace(seed=seed), finetune=replace(cfg.finetune, seed=seed))


def summarize_seeds(per_seed: list[list[dict]], seeds: list[int]) -> list[dict]:
    """One row per method: each number's mean over seeds, and ``<key>_spread`` = half its range
    (for two seeds, each seed's distance from the mean); the per-seed rows stay under "seeds"."""
    out = []
    for rows in zip(*per_seed):
        row = {"method": rows[0]["method"], "seeds": {str(s): r for s, r in zip(seeds, rows)}}
        for key, value in rows[0].items():
            values = [r[key] for r in rows]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and None not in values:
                row[key] = sum(values) / len(values)
                row[f"{key}_spread"] = (max(values) - min(values)) / 2
            elif not isinstance(value, dict):
                row.setdefault(key, value)
        out.append(row)
    return out


def _one_seed(teacher: nn.Module, classifier: nn.Module, real_images: torch.Tensor, real_labels: torch.Tensor,
              cfg: CompareConfig, seed: int, features: FeatureNetwork | None, progress, on_trained):
    """``run_compare`` with training seed ``seed``: (rows, plain SiD's remain images or None).

    Top level and free of closures over the caller, so a worker process can run it.
    """
    sid: dict = {}

    def keep(method, images):
        if method == "sid":
            sid["images"] = images

    report = (lambda m, i, n: progress(f"{m} (seed {seed})", i, n)) if progress else None
    trained = (lambda m, t: on_trained(m, seed, t)) if on_trained else None
    rows = run_compare(teacher, classifier, real_images, real_labels, with_training_seed(cfg, seed),
                       features=features, progress=report, on_trained=trained, on_images=keep)
    return rows, sid.get("images")


def run_compare_seeds(teacher: nn.Module, classifier: nn.Module, real_images: torch.Tensor,
                      real_labels: torch.Tensor, cfg: CompareConfig, seeds: list[int], *,
                      features: FeatureNetwork | None = None,
                      progress: Callable[[str, int, int], None] | None = None,
                      on_trained: Callable[[str, int, Trained], None] | None = None,
                      jobs: int = 1, threads_per_job: int = 1) -> tuple[list[dict], dict]:
    """``run_compare`` once per training seed: (summary rows, noise floor).

    The noise floor is what two runs of the same method differ by with nothing changed but the
    seed: plain SiD seed against seed, in retention (same noise, same class) and in FID. A gap
    between methods smaller than it is not a difference.

    ``jobs > 1`` runs the seeds in that many spawned worker processes at once, each pinned to
    ``threads_per_job`` torch threads (the seeds are independent; a small model does not fill
    several cores with intra-op threads). ``features``, ``progress`` and ``on_trained`` must then
    be picklable (top-level functions, ``functools.partial`` of them, modules).
    """
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"training seeds must be distinct and at least one, got {seeds}")
    if jobs < 1 or threads_per_job < 1:
        raise ValueError(f"jobs and threads_per_job must be >= 1, got {jobs} and {threads_per_job}")
    args = [(teacher, classifier, real_images, real_labels, cfg, seed, features, progress, on_trained)
            for seed in seeds]
    if jobs == 1 or len(seeds) == 1:
        results = [_one_seed(*a) for a in args]
    else:
        context = multiprocessing.get_context("spawn")  # fork would copy the parent's torch thread pools
        with ProcessPoolExecutor(min(jobs, len(seeds)), mp_context=context, initializer=torch.set_num_threads,
                                 initargs=(threads_per_job,)) as pool:
            results = [f.result() for f in [pool.submit(_one_seed, *a) for a in args]]
    per_seed = [rows for rows, _ in results]
    sid_images = {seed: images for seed, (_, images) in zip(seeds, results) if images is not None}
    floor: dict = {"seeds": list(seeds)}
    pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:] if a in sid_images and b in sid_images]
    if pairs:
        floor["sid_retention_seed_vs_seed"] = sum(
            perceptual_distance(sid_images[a], sid_images[b], classifier).mean().item() for a, b in pairs) / len(pairs)
        sid_fids = [r["fid"] for rows in per_seed for r in rows if r["method"] == "sid"]
        floor["sid_fid_spread"] = (max(sid_fids) - min(sid_fids)) / 2
    return summarize_seeds(per_seed, list(seeds)), floor


__all__ = ["METHODS", "CompareConfig", "Trained", "train_method", "run_compare", "run_compare_seeds",
           "summarize_seeds", "with_training_seed"]
