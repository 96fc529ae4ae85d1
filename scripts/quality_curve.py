"""FID-vs-steps curve for SFD and plain SiD on the embedded demo (issue 15): JSON, PNG, grids.

    OMP_NUM_THREADS=1 python scripts/quality_curve.py --out docs/quality --steps 400

FID is reported in the independent LeNet features (sfd_fast/eval/fid_network.py: nothing was
trained, tuned or selected on it) and, beside it, in the classifier features that budgets were
chosen by. The teacher row uses its Heun sampler; the floor is real training digits against the
held-out ones. Threads are pinned (--threads, default 1) and recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sfd_fast.cli.args import add_forget_args, add_sfd_config_args, sfd_config
from sfd_fast.eval.classifier import CLASSIFIER_FILE, DigitClassifier
from sfd_fast.eval.curve import CURVE_METHODS, CurveConfig, run_curve
from sfd_fast.eval.evaluate import class_grid, teacher_sampler
from sfd_fast.eval.fid_network import FID_NETWORK_FILE, independent_features
from sfd_fast.eval.report import line_chart
from sfd_fast.io.atomic import atomic_write_bytes, check_writable_dir, write_json
from sfd_fast.io.data import ASSETS, load_embedded_mnist
from sfd_fast.io.provenance import commit_label, git_commit
from sfd_fast.models.networks import load_denoiser


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (curve.json, curve.png, grids)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                   help="instead of training: combine the curve.json of runs made in parallel (one method each, "
                        "same settings) into --out")
    p.add_argument("--teacher", type=Path, default=ASSETS / "teacher", help="teacher folder (default: embedded)")
    p.add_argument("--steps", type=int, default=400, help="training iterations per method (default: 400)")
    p.add_argument("--eval-at", type=int, nargs="+", default=None,
                   help="steps to evaluate at (default: 0 and powers of two times 25 up to --steps)")
    p.add_argument("--methods", nargs="+", default=list(CURVE_METHODS), choices=CURVE_METHODS,
                   help="methods to train (default: sfd sid)")
    p.add_argument("--per-class", type=int, default=100, help="samples per class per evaluation (default: 100)")
    p.add_argument("--teacher-steps", type=int, default=18, help="Heun steps of the teacher row (default: 18)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, pinned and recorded (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="training and evaluation seed (default: 0)")
    add_forget_args(p)
    add_sfd_config_args(p)
    p.set_defaults(preset="demo")
    return p.parse_args(argv)


def default_eval_at(steps: int) -> tuple[int, ...]:
    points, s = [0], 25
    while s < steps:
        points.append(s)
        s *= 2
    return tuple(points + [steps])


def curve_table(result: dict) -> str:
    """Markdown: one row per (method, step), FIDs and spreads as ratios to the teacher's."""
    t = result["teacher"]
    t_var = t["independent"]["mean_class_variance"]
    floor = result["floor_real_train_vs_test"]
    lines = ["| method | steps | train s | FID LeNet ↓ | x teacher | FID classifier ↓ | class variance / teacher's "
             "(LeNet) | forget acc | override | remain acc |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| real train vs test (floor) | – | – | {floor['independent']['fid']:.2f} | – | "
             f"{floor['classifier']['fid']:.2f} | – | – | – | – |",
             f"| teacher, Heun {result['config']['teacher_steps']} steps | – | – | {t['independent']['fid']:.2f} | 1.00 | "
             f"{t['classifier']['fid']:.2f} | 1.00 | {t['forget_accuracy']:.3f} | {t['override_rate']:.3f} | "
             f"{t['remain_accuracy']:.3f} |"]
    for method, run in result["methods"].items():
        for p in run["points"]:
            lines.append(f"| {method} | {p['step']} | {p['train_seconds']:.0f} | {p['independent']['fid']:.2f} | "
                         f"{p['independent']['fid'] / t['independent']['fid']:.2f} | {p['classifier']['fid']:.2f} | "
                         f"{p['independent']['mean_class_variance'] / t_var:.2f} | {p['forget_accuracy']:.3f} | "
                         f"{p['override_rate']:.3f} | {p['remain_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    write_json(result, out / "curve.json")
    atomic_write_bytes(out / "curve.md", curve_table(result).encode())
    series = {f"{m} (LeNet)": [(p["step"], p["independent"]["fid"]) for p in r["points"]]
              for m, r in result["methods"].items()}
    levels = {"teacher": result["teacher"]["independent"]["fid"],
              "real floor": result["floor_real_train_vs_test"]["independent"]["fid"]}
    atomic_write_bytes(out / "curve.png", line_chart(series, levels, "FID on remain classes, independent LeNet "
                                                     "features (lower is better)", "training steps"))
    print(json.dumps({m: [(p["step"], round(p["independent"]["fid"], 2), round(p["classifier"]["fid"], 2))
                          for p in r["points"]] for m, r in result["methods"].items()}))
    print(f"teacher {levels['teacher']:.2f}, floor {levels['real floor']:.2f}; wrote {out}/curve.json, .md, .png")


def merge(parts: list[Path], out: Path) -> int:
    import shutil

    results = [json.loads((d / "curve.json").read_text()) for d in parts]
    first = results[0]
    for d, r in zip(parts[1:], results[1:]):
        mine = {k: v for k, v in r["config"].items() if k != "methods"}
        if mine != {k: v for k, v in first["config"].items() if k != "methods"}:
            raise SystemExit(f"{d}/curve.json was made with other settings than {parts[0]}/curve.json")
    merged = {**first, "methods": {m: v for r in results for m, v in r["methods"].items()},
              "merged_from": [str(d) for d in parts], "environment": [r["environment"] for r in results]}
    out.mkdir(parents=True, exist_ok=True)
    for d in parts:
        for png in d.glob("samples_*.png"):
            if png.parent.resolve() != out.resolve():
                shutil.copy(png, out / png.name)
    write_outputs(merged, out)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    commit = git_commit()  # before training: the code this run is made with
    if args.merge:
        return merge(args.merge, check_writable_dir(args.out))
    torch.set_num_threads(args.threads)
    out = check_writable_dir(args.out)
    config = sfd_config(args)
    cfg = CurveConfig(sfd=config, steps=args.steps, eval_at=tuple(args.eval_at or default_eval_at(args.steps)),
                      methods=tuple(args.methods), per_class=args.per_class, teacher_steps=args.teacher_steps,
                      seed=args.seed)
    teacher = load_denoiser(args.teacher)
    classifier = DigitClassifier.load(CLASSIFIER_FILE).requires_grad_(False)
    side = teacher.image_shape[-1]
    bars = {}

    def progress(method: str, i: int, n: int) -> None:
        bar = bars.setdefault(method, tqdm(total=n, desc=method))
        bar.update()
        if i == n:
            bar.close()

    result = run_curve(teacher, classifier, independent_features(), load_embedded_mnist("test", side),
                       load_embedded_mnist("train", side), cfg, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    for method, run in result["methods"].items():
        class_grid(run.pop("generator"), teacher.num_classes, 10, teacher.image_shape, out / f"samples_{method}.png")
    class_grid(teacher_sampler(teacher, cfg.teacher_steps)[0], teacher.num_classes, 10, teacher.image_shape,
               out / "samples_teacher.png")
    result["environment"] = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "commit": commit_label(commit), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fid_network": str(FID_NETWORK_FILE.relative_to(ASSETS.parent.parent))}
    write_outputs(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
