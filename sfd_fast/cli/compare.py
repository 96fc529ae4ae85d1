"""``sfd-fast compare``: load models and data, run the comparison, write table, plots, grids."""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from ..eval.compare import CompareConfig, run_compare_seeds
from ..eval.evaluate import class_grid
from ..eval.report import markdown_table, write_report
from ..io.provenance import commit_label, git_commit
from .args import add_common, add_forget_args, add_sfd_config_args, sfd_config


def environment(commit: dict) -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, commit {commit_label(commit)}, "
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")


class FifthsProgress:
    """Prints each method's progress at every fifth of its steps (picklable, for --jobs workers)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def __call__(self, method: str, i: int, n: int) -> None:
        if (i == n or i % max(1, n // 5) == 0) and self.last.get(method) != i:
            self.last[method] = i
            print(f"  {method}: {i}/{n}", file=sys.stderr, flush=True)


def _first_seed_grid(out: Path, num_classes: int, shape, device: str, first_seed: int, method: str, seed: int,
                     trained) -> None:
    """One sample grid per method, from the first training seed."""
    if seed == first_seed:
        class_grid(trained.sampler, num_classes, 8, shape, out / f"samples_{method}.png", device=device)


def compare_main(teacher_dir, classifier_path, out: Path, cfg: CompareConfig, *, seeds: tuple[int, ...] = (0,),
                 real_split: str = "test", fid_features: str = "lenet", inception_onnx: Path | None = None,
                 device: str = "cpu", progress: bool = True, jobs: int = 1) -> list[dict]:
    commit = git_commit()  # before training: the code this run is made with
    from ..eval.classifier import DigitClassifier
    from ..eval.fid import ClassifierFeatures, OnnxFeatures
    from ..eval.fid_network import FID_NETWORK_SHAPE, independent_features
    from ..io.data import load_embedded_mnist
    from ..models.networks import load_denoiser

    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and inception_onnx is not None:
        raise ValueError("--jobs > 1 cannot share an onnxruntime session with worker processes: "
                         "use --jobs 1 with --inception-onnx")
    teacher = load_denoiser(teacher_dir, device)
    classifier = DigitClassifier.load(classifier_path, device).requires_grad_(False)
    images, labels = load_embedded_mnist(real_split, teacher.image_shape[-1])
    if inception_onnx is not None:
        features = OnnxFeatures(inception_onnx)
    elif fid_features == "lenet":
        if tuple(teacher.image_shape) != FID_NETWORK_SHAPE:
            raise ValueError(f"--fid-features lenet reads {FID_NETWORK_SHAPE} digits; the teacher makes "
                             f"{tuple(teacher.image_shape)} images: pass --fid-features classifier or --inception-onnx")
        features = independent_features(device=device)
    else:
        features = ClassifierFeatures(classifier)
    out.mkdir(parents=True, exist_ok=True)
    threads_per_job = max(1, torch.get_num_threads() // jobs)
    grid = functools.partial(_first_seed_grid, out, teacher.num_classes, teacher.image_shape, device, seeds[0])
    rows, floor = run_compare_seeds(teacher, classifier, images.to(device), labels.to(device), cfg, list(seeds),
                                    features=features, progress=FifthsProgress() if progress else None,
                                    on_trained=grid, jobs=jobs, threads_per_job=threads_per_job)
    meta = {"command": "sfd-fast " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("sfd-fast") else
            shlex.join(sys.argv), "config": cfg.to_dict(), "environment": environment(commit),
            "real_split": real_split, "teacher": str(teacher_dir), "classifier": str(classifier_path),
            "noise_floor": floor, "jobs": jobs, "threads_per_job": threads_per_job if jobs > 1 else None}
    write_report(rows, meta, out)
    print(markdown_table(rows))
    return rows


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds like 0,1, got {text!r}")
    return seeds


def add_parsers(sub) -> None:
    p = sub.add_parser("compare", help="compare unlearning methods on one evaluation (table + plots)",
                       description="Train the chosen methods (teacher, sid, sfd, robust_sfd, esd, retain_distill, "
                                   "advunlearn) with fixed seeds and budgets and write compare.md/.json/.csv/.png "
                                   "plus per-method sample grids to --out.")
    p.add_argument("--teacher", type=Path, default=None, help="teacher directory (default: embedded demo teacher)")
    p.add_argument("--classifier", type=Path, default=None, help="classifier .safetensors (default: embedded)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default: runs/compare)")
    p.add_argument("--methods", default="teacher,sid,sfd,robust_sfd,esd,retain_distill,advunlearn",
                   help="comma-separated methods (default: all)")
    add_sfd_config_args(p)
    p.add_argument("--distill-steps", type=int, default=400,
                   help="iterations of sid/sfd/robust_sfd (default: 400, where plain SiD has flattened and SFD "
                        "is within its FID on the demo: docs/quality)")
    p.add_argument("--finetune-steps", type=int, default=50, help="iterations of esd/retain_distill/advunlearn (default: 50)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="Adam lr of the fine-tuning baselines (default: per method, 1e-4 for esd/retain_distill "
                        "and 1e-2 for advunlearn, which trains one embedding row; baselines/finetune.py)")
    p.add_argument("--finetune-batch", type=int, default=8, help="forget (and retain) batch of fine-tuning (default: 8)")
    p.add_argument("--robust-inner-steps", type=int, default=3, help="robust_sfd inner attack steps (default: 3)")
    p.add_argument("--teacher-steps", type=int, default=8, help="Heun steps of diffusion-sampled rows (default: 8)")
    p.add_argument("--attack-steps", type=int, default=30, help="embedding attack Adam steps (default: 30)")
    p.add_argument("--attack-lr", type=float, default=0.05, help="embedding attack lr (default: 0.05)")
    p.add_argument("--attack-init", default="forget", choices=["forget", "mean", "random"],
                   help="attack start: forget-class row, table mean, or random (default: forget)")
    p.add_argument("--attack-batch", type=int, default=16, help="noises per attack step (default: 16)")
    p.add_argument("--attack-samples", type=int, default=100, help="held-out noises scoring ASR (default: 100)")
    p.add_argument("--attack-sampler-steps", type=int, default=3,
                   help="differentiable Heun steps when attacking diffusion rows (default: 3)")
    p.add_argument("--per-class", type=int, default=50, help="evaluation samples per class (default: 50)")
    p.add_argument("--train-seeds", type=_seeds, default=(0, 1), metavar="S[,S..]",
                   help="training seeds; every method runs once per seed and the table shows mean ± half the "
                        "range, with plain SiD seed-vs-seed as the noise floor; --seed fixes the evaluation "
                        "noise and the attack (default: 0,1)")
    p.add_argument("--fid-features", default="lenet", choices=["lenet", "classifier"],
                   help="FID feature space: the independent LeNet nothing was tuned on (16x16 digits; "
                        "sfd_fast/eval/fid_network.py) or the evaluation classifier's (default: lenet)")
    p.add_argument("--inception-onnx", type=Path, default=None,
                   help="local ONNX feature network for FID (e.g. Inception pool3); overrides --fid-features")
    # The default teacher is the embedded demo one, so the default preset is the demo's (`sfd-fast demo`
    # trains with "quality": docs/quality/sweep.md); --preset reference for the authors'.
    p.set_defaults(preset="quality")
    p.add_argument("--jobs", type=int, default=1,
                   help="train the seeds in this many worker processes at once, each with the torch threads "
                        "divided between them (at least 1); the seeds are independent (default: 1)")
    add_forget_args(p)
    add_common(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from dataclasses import replace

    from ..baselines.finetune import FinetuneConfig
    from ..baselines.robust_sfd import RobustConfig
    from ..eval.attack import AttackConfig
    from ..eval.classifier import CLASSIFIER_FILE
    from .demo import TEACHER_DIR

    torch.manual_seed(args.seed)
    cfg = CompareConfig(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), sfd=sfd_config(args),
        distill_steps=args.distill_steps, finetune_steps=args.finetune_steps,
        robust=RobustConfig(inner_steps=args.robust_inner_steps),
        finetune=replace(FinetuneConfig(), lr=args.finetune_lr, batch_size=args.finetune_batch,
                         retain_batch_size=args.finetune_batch, seed=args.seed),
        teacher_steps=args.teacher_steps,
        attack=AttackConfig(steps=args.attack_steps, lr=args.attack_lr, init=args.attack_init,
                            batch_size=args.attack_batch, eval_samples=args.attack_samples, seed=args.seed),
        attack_sampler_steps=args.attack_sampler_steps, per_class=args.per_class, seed=args.seed)
    compare_main(args.teacher or TEACHER_DIR, args.classifier or CLASSIFIER_FILE, args.out, cfg,
                 seeds=args.train_seeds, fid_features=args.fid_features, inception_onnx=args.inception_onnx,
                 device=args.device, progress=not args.no_progress, jobs=args.jobs)
    print(f"wrote {args.out}/compare.md, compare.json, compare.csv, compare.png, samples_*.png")
    return 0
