"""One Markdown table from several ``quality_curve.py`` runs that differ in one setting (issue 15).

    python scripts/sweep_table.py docs/quality/sweep/*/curve.json --baseline docs/quality/curve.json \
        --step 400 --out docs/quality/sweep.md

Each row is a run's SFD point at ``--step``; its label is the settings that differ from the
baseline run's. Columns: FID in the classifier features (what settings are chosen by) and in the
independent LeNet features (what quality is reported in), the LeNet FID and mean per-class feature
variance as ratios to the same run's teacher row (its own teacher and evaluation noise), forget /
override / remain accuracy and training seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _point(curve: dict, step: int) -> dict:
    points = {p["step"]: p for p in curve["methods"]["sfd"]["points"]}
    if step not in points:
        raise SystemExit(f"no SFD point at step {step}; the run has {sorted(points)}")
    return points[step]


def _label(cfg: dict, base: dict, baseline_label: str) -> str:
    diff = [f"{k}={cfg[k]}" for k in sorted(cfg) if k not in ("seed",) and cfg[k] != base.get(k)]
    return ", ".join(diff) or baseline_label


def table(curves: list[dict], baseline: dict, step: int, baseline_label: str = "baseline") -> str:
    base_cfg = baseline["config"]["sfd"]
    lines = ["| setting | FID classifier | FID LeNet | LeNet FID / teacher | class variance / teacher | forget acc "
             "| override | remain acc | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for curve in [baseline, *curves]:
        p = _point(curve, step)
        # Each run's own teacher row: same teacher and evaluation noise as its generator (another
        # --seed or --teacher moves both).
        ind, teacher = p["independent"], curve["teacher"]["independent"]
        lines.append(f"| {_label(curve['config']['sfd'], base_cfg, baseline_label)} | {p['classifier']['fid']:.2f} | {ind['fid']:.2f} "
                     f"| {ind['fid'] / teacher['fid']:.2f}x | {ind['mean_class_variance'] / teacher['mean_class_variance']:.2f}x "
                     f"| {p['forget_accuracy']:.3f} | {p['override_rate']:.3f} | {p['remain_accuracy']:.3f} "
                     f"| {p['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("curves", type=Path, nargs="+", help="curve.json of each run")
    p.add_argument("--baseline", type=Path, required=True, help="curve.json of the run the others change one thing of")
    p.add_argument("--step", type=int, default=400, help="training step to read (default: 400)")
    p.add_argument("--baseline-label", default="baseline",
                   help="first column of the baseline's row, e.g. its preset (default: baseline)")
    p.add_argument("--out", type=Path, default=None, help="write the table here (default: print it)")
    args = p.parse_args(argv)
    load = lambda path: json.loads(path.read_text())  # noqa: E731
    text = table([load(c) for c in args.curves], load(args.baseline), args.step, args.baseline_label)
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
