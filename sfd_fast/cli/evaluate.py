"""``sfd-fast evaluate``: classifier metrics of a class-conditional generator or a teacher sampler."""

from __future__ import annotations

import json
from pathlib import Path

from .args import add_common, add_forget_args, is_text_to_image_folder


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="score a generator or a teacher sampler with the classifier",
                       description="Forget/override/remain accuracy of a one-step generator (--generator) or a "
                                   "teacher's Heun sampler (--teacher), scored by a classifier built for its images "
                                   "(the embedded one: 1x16x16 digits, 10 classes); writes metrics.json and a class "
                                   "grid. Text-to-image runs are scored by `sfd-fast evaluate-t2i`.")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--generator", type=Path, help="generator directory written by distill/demo")
    who.add_argument("--teacher", type=Path, help="teacher model directory (sampled with Heun)")
    p.add_argument("--classifier", type=Path, default=None,
                   help="DigitClassifier weights (.safetensors) with its config (channels, num_classes, feature_dim, "
                        "resolution) in the .json beside it or in the file's metadata, e.g. from "
                        "`sfd-fast train-classifier` (default: the embedded 1x16x16 digit classifier)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--per-class", type=int, default=100, help="samples per class (default: 100)")
    p.add_argument("--teacher-steps", type=int, default=18, help="Heun steps for --teacher (default: 18)")
    add_forget_args(p)
    add_common(p)
    p.set_defaults(handler=run)


def _refuse_text_to_image(path: Path, flag: str) -> None:
    from ..train.text_to_image import is_t2i_generator

    if is_t2i_generator(path) or is_text_to_image_folder(path):
        what = "a text-to-image generator folder" if is_t2i_generator(path) else "a text-to-image pipeline folder"
        raise ValueError(f"{flag} {str(path)!r} is {what}; `evaluate` scores class-conditional models - score a "
                         "text-to-image run with `sfd-fast evaluate-t2i --run <distill --pipeline out folder> "
                         "--clip CLIP_DIR --out DIR`")


def run(args) -> int:
    from ..core.forget import ForgetSpec
    from ..eval.classifier import CLASSIFIER_FILE, DigitClassifier
    from ..eval.evaluate import (check_classifier_fits, check_weights_finite, class_grid, evaluate_sampler,
                                 teacher_sampler)
    from ..io.atomic import write_json
    from ..models.networks import load_denoiser, load_generator

    # Every check before anything is written: a refused run leaves no --out folder.
    for name in ("per_class", "teacher_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.classifier is not None and args.classifier.suffix != ".safetensors":
        raise ValueError(f"--classifier must be a .safetensors file (its config in the .json beside it), "
                         f"got {str(args.classifier)!r}")
    path, flag = (args.generator, "--generator") if args.generator is not None else (args.teacher, "--teacher")
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {str(path)!r} does not exist or is not a directory")
    _refuse_text_to_image(path, flag)
    classifier_file = args.classifier or CLASSIFIER_FILE
    classifier = DigitClassifier.load(classifier_file, args.device)
    if args.generator is not None:
        sampler = load_generator(args.generator, args.device)
        nfe, num_classes, shape = 1, sampler.denoiser.num_classes, sampler.denoiser.image_shape
    else:
        teacher = load_denoiser(args.teacher, args.device)
        sampler, nfe = teacher_sampler(teacher, args.teacher_steps)
        num_classes, shape = teacher.num_classes, teacher.image_shape
    check_weights_finite(sampler if args.generator is not None else teacher, f"{flag} {str(path)!r}")
    name = "the embedded classifier" if args.classifier is None else f"the classifier {str(classifier_file)!r}"
    check_classifier_fits(classifier, shape, num_classes, name, "the generator" if args.generator else "the teacher")
    spec = ForgetSpec(num_classes, args.forget, args.override)
    metrics = evaluate_sampler(sampler, nfe, classifier, spec, shape, per_class=args.per_class, seed=args.seed,
                               device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(metrics, args.out / "metrics.json")
    class_grid(sampler, num_classes, 10, shape, args.out / "samples.png", device=args.device)
    print(json.dumps(metrics, indent=2))
    return 0
