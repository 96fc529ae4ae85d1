"""``sfd-fast evaluate``: classifier metrics of a class-conditional generator or a teacher sampler."""

from __future__ import annotations

import json
from pathlib import Path

from .args import add_common, add_forget_args


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="score a generator or a teacher sampler with the classifier",
                       description="Forget/override/remain accuracy of a one-step generator (--generator) or a "
                                   "teacher's Heun sampler (--teacher); writes metrics.json and a class grid.")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--generator", type=Path, help="generator directory written by distill/demo")
    who.add_argument("--teacher", type=Path, help="teacher model directory (sampled with Heun)")
    p.add_argument("--classifier", type=Path, default=None, help="classifier .safetensors (default: embedded)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--per-class", type=int, default=100, help="samples per class (default: 100)")
    p.add_argument("--teacher-steps", type=int, default=18, help="Heun steps for --teacher (default: 18)")
    add_forget_args(p)
    add_common(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..core.forget import ForgetSpec
    from ..eval.classifier import CLASSIFIER_FILE, DigitClassifier
    from ..eval.evaluate import class_grid, evaluate_sampler, teacher_sampler
    from ..io.atomic import write_json
    from ..models.networks import load_denoiser, load_generator

    classifier = DigitClassifier.load(args.classifier or CLASSIFIER_FILE, args.device)
    if args.generator is not None:
        sampler = load_generator(args.generator, args.device)
        nfe, num_classes, shape = 1, sampler.denoiser.num_classes, sampler.denoiser.image_shape
    else:
        teacher = load_denoiser(args.teacher, args.device)
        sampler, nfe = teacher_sampler(teacher, args.teacher_steps)
        num_classes, shape = teacher.num_classes, teacher.image_shape
    spec = ForgetSpec(num_classes, args.forget, args.override)
    metrics = evaluate_sampler(sampler, nfe, classifier, spec, shape, per_class=args.per_class, seed=args.seed,
                               device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(metrics, args.out / "metrics.json")
    class_grid(sampler, num_classes, 10, shape, args.out / "samples.png", device=args.device)
    print(json.dumps(metrics, indent=2))
    return 0
