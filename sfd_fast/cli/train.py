"""Commands that train: ``pretrain-teacher``, ``train-classifier`` and class-label ``distill``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.config import SFDConfig
from ..models.unet import UNET_PRESETS, UNetConfig
from .args import add_common, add_forget_args, add_resilience_args, add_sfd_config_args, sfd_config, under_torchrun


def add_parsers(sub) -> None:
    p = sub.add_parser("pretrain-teacher", help="train a class-conditional EDM teacher on the embedded data",
                       description="Train the teacher with the EDM loss on the embedded MNIST subset and save "
                                   "it (diffusers config + safetensors) to --out.")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--preset", default="demo", choices=sorted(UNET_PRESETS), help="UNet preset (default: demo)")
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps (default: 4000)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    add_common(p)
    p.set_defaults(handler=run_pretrain_teacher)

    p = sub.add_parser("train-classifier", help="train the evaluation classifier on the embedded data",
                       description="Train the small CNN that scores generated digits; saves safetensors.")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.add_argument("--resolution", type=int, default=16, help="image side (default: 16)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    add_common(p)
    p.set_defaults(handler=run_train_classifier)

    p = sub.add_parser("distill", help="run SFD on a teacher from a local directory",
                       description="Distil a teacher (a directory written by pretrain-teacher/save_denoiser, or a "
                                   "diffusers DDPM pipeline with unet/ and scheduler/) into a one-step generator "
                                   "that forgets --forget. Hyperparameters start from --preset and --config.")
    p.add_argument("--teacher", type=Path, required=True, help="teacher model directory")
    p.add_argument("--pipeline", type=Path, metavar="DIR",
                   help="text-to-image mode on a diffusers SD-style folder; see `sfd-fast distill --pipeline DIR --help`")
    p.add_argument("--out", type=Path, required=True, help="output folder (generator/, config.json, train_log.json)")
    p.add_argument("--steps", type=int, default=1000, help="SFD iterations (default: 1000)")
    add_sfd_config_args(p)
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton", "cuda"],
                   help="loss implementation (default: $SFD_FAST_BACKEND or auto)")
    add_resilience_args(p)
    add_forget_args(p)
    add_common(p)
    p.set_defaults(handler=run_distill)


def run_pretrain_teacher(args) -> int:
    import torch

    from ..io.data import load_embedded_mnist
    from ..models.networks import save_denoiser
    from ..train.pretrain import pretrain_teacher

    unet_config = UNetConfig.from_name(args.preset)
    images, labels = load_embedded_mnist("train", unet_config.resolution)
    torch.manual_seed(args.seed)
    teacher = pretrain_teacher(images, labels, unet_config, steps=args.steps, batch_size=args.batch_size,
                               lr=args.lr, seed=args.seed, progress=not args.no_progress)
    save_denoiser(teacher, args.out)
    print(f"saved teacher to {args.out}")
    return 0


def run_train_classifier(args) -> int:
    from ..eval.classifier import train_classifier
    from ..io.data import load_embedded_mnist

    images, labels = load_embedded_mnist("train", args.resolution)
    model = train_classifier(images, labels, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    test_x, test_y = load_embedded_mnist("test", args.resolution)
    accuracy = (model.predict(test_x) == test_y).float().mean().item()
    model.save(args.out)
    print(f"saved classifier to {args.out}; test accuracy {accuracy:.4f} on {len(test_y)} held-out digits")
    return 0


def run_distill(args) -> int:
    from ..io.atomic import write_json
    from ..models.networks import load_denoiser, save_generator
    from ..train.distill import distill

    config = sfd_config(args)
    if args.resume or args.checkpoint_every or args.checkpoint_dir is not None or under_torchrun():
        return _distill_resilient(args, config)
    teacher = load_denoiser(args.teacher, args.device)
    log = []
    state = distill(teacher, config, args.steps, device=args.device, backend=args.backend,
                    progress=not args.no_progress, on_log=lambda step, m: log.append({"step": step, **m}))
    args.out.mkdir(parents=True, exist_ok=True)
    save_generator(state.generator_ema, args.out / "generator")
    write_json(config.to_dict(), args.out / "config.json")
    write_json({"log": log}, args.out / "train_log.json")
    print(f"saved generator to {args.out / 'generator'}")
    return 0


def _distill_resilient(args: argparse.Namespace, config: SFDConfig) -> int:
    """`distill` with checkpoints/resume/signals, on one process or every torchrun rank."""
    from ..core.faults import NonFiniteError
    from ..core.state import SFDState
    from ..io.atomic import write_json
    from ..models.networks import load_denoiser, save_generator
    from ..train import distributed
    from ..train.resilient import run_resilient

    device = args.device
    if under_torchrun():  # one rank per process
        device = distributed.init_from_env("gloo" if args.device == "cpu" else "nccl")
    state = None
    try:
        state = SFDState.create(config, load_denoiser(args.teacher, device), device)
        distributed.distribute_state(state, "ddp")
        root = args.checkpoint_dir or args.out / "checkpoints"
        say = print if distributed.is_main() else (lambda *a, **k: None)
        try:
            result = run_resilient(state, args.steps, checkpoint_root=root, checkpoint_every=args.checkpoint_every,
                                   keep_last=args.keep_last, resume=args.resume, backend=args.backend,
                                   on_log=(lambda step, m: say(f"step {step}: " + " ".join(
                                       f"{k}={v:.4g}" for k, v in sorted(m.items())))) if not args.no_progress
                                   else None)
        except NonFiniteError as exc:
            print(f"sfd-fast distill: stopped: {exc}", file=sys.stderr)
            return 3
        if result.report_start_and_stop(say):
            return 0
        if distributed.is_main():
            args.out.mkdir(parents=True, exist_ok=True)
            save_generator(state.generator_ema, args.out / "generator")
            write_json(config.to_dict(), args.out / "config.json")
            write_json({"log": result.log}, args.out / "train_log.json")
            say(f"saved generator to {args.out / 'generator'}; checkpoint {result.checkpoint}")
        return 0
    finally:
        distributed.shutdown(state)
