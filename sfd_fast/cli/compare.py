"""Glue of ``sfd-fast compare``: load models and data, run the comparison, write table, plots, grids."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from ..eval.compare import CompareConfig, run_compare
from ..eval.report import markdown_table, write_report
from ..eval.evaluate import class_grid


def environment() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, commit {commit}, "
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")


def compare_main(teacher_dir, classifier_path, out: Path, cfg: CompareConfig, *, real_split: str = "test",
                 inception_onnx: Path | None = None, device: str = "cpu", progress: bool = True) -> list[dict]:
    from ..eval.classifier import DigitClassifier
    from ..io.data import load_embedded_mnist
    from ..eval.fid import OnnxFeatures
    from ..models.networks import load_denoiser

    teacher = load_denoiser(teacher_dir, device)
    classifier = DigitClassifier.load(classifier_path, device).requires_grad_(False)
    images, labels = load_embedded_mnist(real_split, teacher.image_shape[-1])
    features = OnnxFeatures(inception_onnx) if inception_onnx is not None else None
    out.mkdir(parents=True, exist_ok=True)
    last = {}

    def report(method: str, i: int, n: int) -> None:
        if progress and (i == n or i % max(1, n // 5) == 0) and last.get(method) != i:
            last[method] = i
            print(f"  {method}: {i}/{n}", file=sys.stderr, flush=True)

    def grid(method, trained):
        class_grid(trained.sampler, teacher.num_classes, 8, teacher.image_shape, out / f"samples_{method}.png",
                   device=device)

    rows = run_compare(teacher, classifier, images.to(device), labels.to(device), cfg, features=features,
                       progress=report, on_trained=grid)
    meta = {"command": "sfd-fast " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("sfd-fast") else
            shlex.join(sys.argv), "config": cfg.to_dict(), "environment": environment(),
            "real_split": real_split, "teacher": str(teacher_dir), "classifier": str(classifier_path)}
    write_report(rows, meta, out)
    print(markdown_table(rows))
    return rows


__all__ = ["compare_main", "environment"]
