"""Argument helpers shared by the command groups: classes to forget, device/seed, checkpoints, configs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..core.config import SFD_PRESETS, SFDConfig, parse_overrides


def _classes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices like '0' or '0,3', got {text!r}")


def _override(text: str) -> tuple[int, ...] | None:
    return None if text == "random" else _classes(text)


def add_forget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--forget", type=_classes, default=(0,), metavar="C[,C..]",
                   help="class(es) to forget (default: 0)")
    p.add_argument("--override", type=_override, default=(1,), metavar="C[,C..]|random",
                   help="override class per forget class, or 'random' for a uniformly drawn remaining class "
                        "per sample (default: 1)")


def add_common(p: argparse.ArgumentParser, seed: int = 0) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=seed, help=f"random seed (default: {seed})")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_sfd_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="reference", choices=sorted(SFD_PRESETS),
                   help="SFD hyperparameter preset (default: %(default)s)")
    p.add_argument("--config", type=Path, help="JSON file of SFDConfig fields overriding the preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one SFDConfig field (JSON value), e.g. --set lr_gen=1e-4; repeatable")


def sfd_config(args) -> SFDConfig:
    """--preset, then --config, then each --set, then the forget/override classes and seed."""
    from ..io.atomic import read_json_object

    config = SFDConfig.from_name(args.preset).to_dict()
    if args.config is not None:
        config.update(read_json_object(args.config, "--config"))
    config.update(parse_overrides(args.set))
    config.update(forget_classes=args.forget, override_classes=args.override, seed=args.seed)
    return SFDConfig.from_dict(config)


# --- scale-out and reliability options of `distill` (sfd_fast.train.resilient, sfd_fast.train.distributed) ---
def add_resilience_args(p: argparse.ArgumentParser,
                        title: str = "checkpoints, resume and multi-GPU (see docs/distributed.md)") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="where full-state checkpoints go (default: <out>/checkpoints when any option here is used)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save a resumable checkpoint every N steps (default: 0 = at the end and on SIGTERM/SIGINT)")
    g.add_argument("--keep-last", type=int, default=3, metavar="N", help="checkpoints kept (default: 3)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir (bit-exact on the same setup)")


def add_overwrite_arg(p: argparse.ArgumentParser, folder: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {folder} even if it is a non-empty folder that sfd_fast did not write (default: "
                        "refuse; a folder sfd_fast wrote, or an empty one, is replaced without it)")


def check_device(text: str) -> str:
    """``text`` if it names a torch device this process can use; ValueError naming it and what is allowed."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a torch device; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, driver)")
            raise ValueError(f"--device {text!r}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text!r}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise ValueError(f"--device {text!r}: sfd_fast runs on cpu or cuda, got {device.type!r}")
    return text


def under_torchrun() -> bool:
    """torchrun started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def add_distributed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: ddp (weights replicated, gradients all-reduced) or fsdp (FSDP2: weights, "
                        "gradients and Adam state sharded per UNet block, sharded DCP checkpoints; needs torchrun) "
                        "(default: ddp)")


def check_distributed(args) -> bool:
    """Whether this process joins a process group; ValueError for --distributed fsdp without torchrun."""
    torchrun_env = under_torchrun() or {"LOCAL_RANK", "MASTER_ADDR"} <= set(os.environ)  # also --nproc-per-node 1
    if args.distributed == "fsdp" and not torchrun_env:
        raise ValueError("--distributed fsdp shards the state across ranks and needs torchrun (e.g. torchrun "
                         "--nproc-per-node 2 -m sfd_fast.cli distill ...); one process without it runs unsharded")
    return under_torchrun() or args.distributed == "fsdp"


# --- how a distillation step runs and how often it reports (class-label and text-to-image `distill`) ---
def add_step_args(p: argparse.ArgumentParser, log_every: int) -> None:
    from ..core.step_options import STEP_PRESETS

    p.add_argument("--step-options", choices=sorted(STEP_PRESETS), default="reference",
                   help="how train_step runs (speed, not math): reference eager, fused (same numbers), "
                        "bf16 (fused + autocast), fast (everything the device allows); see docs/fast_step.md")
    p.add_argument("--log-every", type=int, default=log_every,
                   help=f"pull metrics to the host every N steps (default: {log_every})")


def check_step_args(args) -> None:
    """ValueError naming the bad value (the parser's choices already cover --step-options)."""
    if args.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {args.log_every}")


# --- folders handed to the wrong command ---
def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_text_to_image_folder(path: Path) -> bool:
    """Whether ``path`` holds a text-conditioned (Stable-Diffusion-style) pipeline or its UNet.

    Such a folder has a ``model_index.json`` naming a text encoder, or a UNet (``unet/`` or the folder
    itself) with cross-attention; class-conditional folders (DDPMPipeline, OneStepPipeline, ours) have neither.
    """
    path = Path(path)
    if "text_encoder" in _json(path / "model_index.json"):
        return True
    for config in (path / "unet" / "config.json", path / "config.json"):
        unet = _json(config)
        if unet.get("_class_name") == "UNet2DConditionModel" or unet.get("cross_attention_dim") is not None:
            return True
    return False


# A stop signal (SIGTERM/SIGINT) ended a run before its last step: not success, so a scheduler
# does not mistake it for a finished run; the checkpoint, if any, is the result (128 + SIGTERM).
EXIT_INTERRUPTED = 143
