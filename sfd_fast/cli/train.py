"""Commands that train: ``pretrain-teacher``, ``train-classifier`` and class-label ``distill``."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

from ..io.atomic import check_replaceable, check_writable_dir
from ..models.unet import UNET_PRESETS, UNetConfig
from .args import (EXIT_INTERRUPTED, add_common, add_distributed_arg, add_forget_args, add_overwrite_arg,
                   add_resilience_args, add_sfd_config_args, add_step_args, check_distributed, check_step_args,
                   is_text_to_image_folder, sfd_config, under_torchrun)


def add_parsers(sub) -> None:
    p = sub.add_parser("pretrain-teacher", help="train a class-conditional EDM teacher on the embedded data",
                       description="Train the teacher with the EDM loss on the embedded MNIST subset and save "
                                   "it (diffusers config + safetensors) to --out.")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--preset", default="demo", choices=sorted(UNET_PRESETS), help="UNet preset (default: demo)")
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps (default: 4000)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--label-dropout", type=float, default=0.0, metavar="P",
                   help="replace each label by a null label with probability P (classifier-free guidance "
                        "training; 0.1 is usual): the teacher then also gives the unconditional score, used by "
                        "ESD and GuidedDenoiser; saved as null_label = the last embedding row (default: 0, none)")
    p.add_argument("--init", type=Path, default=None, metavar="DIR",
                   help="continue from this teacher folder instead of a fresh UNet (with --label-dropout, a "
                        "teacher without a null label gets one; default: train from scratch)")
    p.add_argument("--null-row-only", action="store_true",
                   help="with --init: train only the null label's embedding row on unconditional denoising; "
                        "every other weight is frozen, so the class-conditional outputs (and the teacher's "
                        "quality) stay exactly as they are")
    add_overwrite_arg(p, "--out")
    add_common(p)
    p.set_defaults(handler=run_pretrain_teacher)

    from ..eval.classifier import train_classifier
    from ..eval.fid_network import train_fid_network

    for name, help_, description, epochs, seed, out_help, train, what in (
            ("train-classifier", "train the evaluation classifier on the embedded data",
             "Train the small CNN that scores generated digits; saves its weights (.safetensors) and its config "
             "(.json beside them: channels, num_classes, feature_dim, resolution), which `sfd-fast evaluate "
             "--classifier` reads.", 8, 0, "output .safetensors file (the .json goes beside it)", train_classifier,
             "classifier"),
            ("train-fid-network", "train the independent FID feature network on the embedded data",
             "Train the LeNet whose 256 features quality (FID, feature variance) is reported in. Nothing is "
             "trained, tuned or selected on it (sfd_fast/eval/fid_network.py); the embedded one is "
             "sfd_fast/assets/fid_lenet.safetensors.", 6, 1, "output .safetensors file", train_fid_network,
             "FID network")):
        p = sub.add_parser(name, help=help_, description=description)
        p.add_argument("--out", type=Path, required=True, help=out_help)
        p.add_argument("--resolution", type=int, default=16, help="image side (default: 16)")
        p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default: {epochs})")
        add_overwrite_arg(p, "--out")
        add_common(p, seed=seed)
        p.set_defaults(handler=run_train_digit_network, train=train, what=what)

    p = sub.add_parser("distill", help="run SFD on a teacher from a local directory",
                       description="Distil a class-conditional teacher (--teacher: a directory written by "
                                   "pretrain-teacher/save_denoiser, or a diffusers DDPM pipeline with unet/ and "
                                   "scheduler/) into a one-step generator that forgets --forget. Hyperparameters "
                                   "start from --preset and --config. A Stable-Diffusion-style folder takes "
                                   "--pipeline DIR instead (text-to-image mode, prompts instead of classes, its own "
                                   "options: `sfd-fast distill --pipeline DIR --help`).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--teacher", type=Path, metavar="DIR", help="class-conditional teacher model directory")
    which.add_argument("--pipeline", type=Path, metavar="DIR",
                       help="text-to-image mode on a diffusers SD-style folder (then no --teacher); see "
                            "`sfd-fast distill --pipeline DIR --help`")
    p.add_argument("--out", type=Path, required=True, help="output folder (generator/, config.json, train_log.json)")
    p.add_argument("--steps", type=int, default=1000, help="SFD iterations (default: 1000)")
    add_sfd_config_args(p)
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton", "cuda"],
                   help="loss implementation (default: $SFD_FAST_BACKEND or auto)")
    add_step_args(p, log_every=25)
    add_resilience_args(p)
    add_distributed_arg(p)
    _add_lora_args(p)
    add_forget_args(p)
    add_overwrite_arg(p, "--out's generator/")
    add_common(p)
    p.set_defaults(handler=run_distill)


def _add_lora_args(p) -> None:
    g = p.add_argument_group("LoRA mode (needs peft; docs/lora.md)")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="fake score = teacher + a rank-R PEFT LoRA adapter, and the teacher and fake-score "
                        "evaluations of the generator step run as one batched call (default: off, full "
                        "fine-tuning). The adapter starts at zero: raise lr_fake with it (on the demo, rank 16 "
                        "needed --set lr_fake=3e-3, 10x the preset; at 3e-4 the forget class collapsed)")
    g.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="LoRA alpha (scale A/R; default: = rank, scale 1)")
    g.add_argument("--lora-generator", action="store_true",
                   help="G = teacher + LoRA too (same rank; reference step options only). The saved generator "
                        "is the EMA of G's merged weights, a plain diffusers model either way")


def _lora_config(args):
    """``LoRAConfig`` from --lora-*, None without --lora-rank; ValueError for what LoRA mode cannot run."""
    if args.lora_rank is None:
        if args.lora_alpha is not None or args.lora_generator:
            raise ValueError("--lora-alpha and --lora-generator need --lora-rank R (LoRA mode is off without it)")
        return None
    from ..core.lora import LoRAConfig, require_peft

    lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, generator=args.lora_generator)
    if under_torchrun() or args.distributed == "fsdp":
        raise ValueError("--lora-rank does not run distributed yet (train/distributed.py wraps the teacher and "
                         "the fake score as two networks; in LoRA mode they are one); run it in one process")
    if lora.generator and args.step_options != "reference":
        raise ValueError(f"--lora-generator runs with --step-options reference only, got {args.step_options!r} "
                         "(the fused step's EMA pairs G's parameters one to one; a LoRA G averages merged weights)")
    try:
        require_peft()
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    return lora


def run_pretrain_teacher(args) -> int:
    import torch

    from ..io.data import load_embedded_mnist
    from ..models.networks import load_denoiser, save_denoiser
    from ..train.pretrain import pretrain_teacher

    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    check_replaceable(args.out, "--out", args.overwrite)  # before training, not after it
    if not 0.0 <= args.label_dropout < 1.0:
        raise ValueError(f"--label-dropout must be in [0, 1) (0.1 is the usual CFG value), got {args.label_dropout}")
    if args.null_row_only and (args.init is None or args.label_dropout > 0):
        raise ValueError("--null-row-only trains the null row of the --init teacher: give --init DIR and no "
                         f"--label-dropout (every label is the null), got --init {args.init}, "
                         f"--label-dropout {args.label_dropout}")
    init = None if args.init is None else load_denoiser(args.init)
    unet_config = UNetConfig.from_name(args.preset)
    if init is not None:
        c, side, _ = init.image_shape
        unet_config = dataclasses.replace(unet_config, channels=c, resolution=side, num_classes=init.num_classes)
    images, labels = load_embedded_mnist("train", unet_config.resolution)
    torch.manual_seed(args.seed)
    teacher = pretrain_teacher(images, labels, unet_config, steps=args.steps, batch_size=args.batch_size,
                               lr=args.lr, label_dropout=args.label_dropout, init=init,
                               null_row_only=args.null_row_only, seed=args.seed,
                               progress=not args.no_progress)
    save_denoiser(teacher, args.out, overwrite=args.overwrite)
    print(f"saved teacher to {args.out}")
    return 0


def run_train_digit_network(args) -> int:
    """``train-classifier`` and ``train-fid-network``: train on the embedded digits, report held-out accuracy."""
    from ..io.data import load_embedded_mnist

    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out must name a .safetensors file, got {str(args.out)!r}")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"--out {str(args.out)!r} exists; pass --overwrite to replace it")
    check_writable_dir(args.out.parent)
    images, labels = load_embedded_mnist("train", args.resolution)
    model = args.train(images, labels, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    test_x, test_y = load_embedded_mnist("test", args.resolution)
    accuracy = (model.predict(test_x) == test_y).float().mean().item()
    model.save(args.out)
    print(f"saved {args.what} to {args.out}; test accuracy {accuracy:.4f} on {len(test_y)} held-out digits")
    return 0


def run_distill(args) -> int:
    """Class-label `distill`: one loop (``run_resilient``) whether or not checkpoints are asked for."""
    import os

    from tqdm.auto import tqdm

    from ..core import dispatch
    from ..core.faults import NonFiniteError
    from ..core.state import SFDState
    from ..core.step import train_step
    from ..io.atomic import write_json
    from ..models.model_card import RunRecord
    from ..models.networks import load_denoiser, save_generator
    from ..train import distributed
    from ..train.resilient import run_resilient

    if is_text_to_image_folder(args.teacher):
        raise ValueError(f"--teacher {str(args.teacher)!r} is a text-to-image (Stable-Diffusion-style) pipeline "
                         "folder; distil it with `sfd-fast distill --pipeline DIR` (prompts, not classes)")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.keep_last < 1:
        raise ValueError(f"--keep-last must be >= 1, got {args.keep_last}")
    check_step_args(args)
    lora = _lora_config(args)
    join_group = check_distributed(args)
    check_writable_dir(args.out)  # refuse now, not after training
    check_replaceable(args.out / "generator", "--out", args.overwrite)
    if lora is not None:
        check_replaceable(args.out / "adapters", "--out", args.overwrite)
    if args.checkpoint_dir is not None:
        check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")
    config = sfd_config(args)
    # The reference preset runs train_step exactly as before (options=None); $SFD_FAST_BACKEND still applies.
    options = None if args.step_options == "reference" else args.step_options
    backend = args.backend or os.environ.get("SFD_FAST_BACKEND") or None
    dispatch.resolve_backend(backend, args.device)  # an unusable --backend stops the run here
    resilient = bool(args.resume or args.checkpoint_every or args.checkpoint_dir is not None or under_torchrun())
    device = args.device
    if join_group:  # one rank per process
        device = distributed.init_from_env("gloo" if args.device == "cpu" else "nccl", one_rank_group=True)
    state = None
    try:
        state = SFDState.create(config, load_denoiser(args.teacher, device), device, lora=lora)
        distributed.distribute_state(state, args.distributed)
        root = (args.checkpoint_dir or args.out / "checkpoints") if resilient else None
        say = print if distributed.is_main() else (lambda *a, **k: None)
        bar = tqdm(total=args.steps, desc="sfd", disable=args.no_progress or resilient or not distributed.is_main())

        def on_log(step, m):  # every --log-every steps (one host sync there, none in between)
            if resilient:
                if not args.no_progress:
                    say(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())))
                return
            bar.update(step - bar.n)
            bar.set_postfix(fake=f"{m['loss_fake']:.3f}", gen=f"{m['loss_gen']:.3f}")

        try:
            result = run_resilient(state, args.steps, checkpoint_root=root, checkpoint_every=args.checkpoint_every,
                                   keep_last=args.keep_last, resume=args.resume, backend=backend,
                                   log_every=args.log_every, on_log=on_log,
                                   step_fn=lambda s: train_step(s, backend, options=options))
        except NonFiniteError as exc:
            print(f"sfd-fast distill: stopped: {exc}", file=sys.stderr)
            return 3
        finally:
            bar.close()
        if result.interrupted and root is None:
            print(f"sfd-fast distill: interrupted at step {state.step} of {args.steps}; nothing written (add "
                  "--checkpoint-every N to make a run resumable)", file=sys.stderr)
            return EXIT_INTERRUPTED
        if result.report_start_and_stop(say):
            return EXIT_INTERRUPTED
        ema = distributed.gathered_module(state, "generator_ema")  # collective under fsdp; None off rank 0
        if distributed.is_main():
            args.out.mkdir(parents=True, exist_ok=True)
            spec = state.forget
            record = RunRecord(teacher=str(args.teacher), forget=tuple(map(str, spec.forget)),
                               override=() if spec.override is None else tuple(map(str, spec.override)),
                               config=config.to_dict(), metrics=result.log[-1] if result.log else None)
            save_generator(ema, args.out / "generator", record=record,  # with its model card
                           overwrite=args.overwrite)
            write_json(config.to_dict(), args.out / "config.json")
            write_json({"log": result.log, "step_options": args.step_options,
                        "lora": None if lora is None else lora.to_dict()}, args.out / "train_log.json")
            if lora is not None:  # the adapters themselves, in PEFT's format (the generator folder is merged)
                from ..core.lora import save_adapters

                save_adapters(state, args.out / "adapters", overwrite=args.overwrite)
            say(f"saved generator to {args.out / 'generator'}" + (f"; checkpoint {result.checkpoint}" if root else ""))
        return 0
    finally:
        distributed.shutdown(state)
