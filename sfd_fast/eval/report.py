"""The comparison table as Markdown, JSON and CSV, and its bar charts as one PNG (PIL only)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..io.atomic import atomic_write_bytes

# (key, header, format); FID's header names its feature space from the rows themselves.
COLUMNS = [
    ("method", "method", "{}"),
    ("nfe", "NFE", "{}"),
    ("forget_accuracy", "forget acc ↓", "{:.3f}"),
    ("override_rate", "override rate ↑", "{:.3f}"),
    ("remain_accuracy", "remain acc ↑", "{:.3f}"),
    ("fid", "FID", "{:.2f}"),
    ("retention_vs_teacher", "retention vs teacher ↓", "{:.4f}"),
    ("retention_vs_sid", "retention vs SiD ↓", "{:.4f}"),
    ("asr_before", "ASR before ↓", "{:.3f}"),
    ("asr_after", "ASR after attack ↓", "{:.3f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("sample_ms_per_image", "sample ms/img", "{:.1f}"),
]
PLOTTED = ["forget_accuracy", "remain_accuracy", "fid", "retention_vs_teacher", "asr_before", "asr_after"]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "–" if value is None else fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    headers = [h if k != "fid" else f"FID ({rows[0]['fid_features']}) ↓" for k, h, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_report(rows: list[dict], meta: dict, out: str | Path) -> dict[str, Path]:
    """compare.md / compare.json / compare.csv / compare.png in ``out``; returns their paths."""
    out = Path(out)
    paths = {ext: out / f"compare.{ext}" for ext in ("md", "json", "csv", "png")}
    md = ["# Unlearning methods compared", "", markdown_table(rows), "",
          f"Command: `{meta.get('command', '')}`", "",
          f"FID features: {rows[0]['fid_features']}. Retention features: {rows[0]['retention_features']}.",
          f"Attack budget: {json.dumps(meta['config']['attack'])} "
          f"(diffusion rows attacked through {meta['config']['attack_sampler_steps']} differentiable Heun steps).",
          f"Environment: {meta.get('environment', '')}", ""]
    atomic_write_bytes(paths["md"], "\n".join(md).encode())
    atomic_write_bytes(paths["json"], (json.dumps({"rows": rows, "meta": meta}, indent=2) + "\n").encode())
    buf = io.StringIO()
    writer = csv.writer(buf)
    keys = [k for k, _, _ in COLUMNS] + ["fid_features", "retention_features", "unlearning_accuracy"]
    writer.writerow(keys)
    for r in rows:
        writer.writerow(["" if r.get(k) is None else r.get(k) for k in keys])
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    atomic_write_bytes(paths["png"], bar_charts(rows))
    return paths


def bar_charts(rows: list[dict], panel_w: int = 300, panel_h: int = 220) -> bytes:
    """One horizontal bar chart per plotted metric, methods as bars, values printed; PNG bytes."""
    from PIL import Image, ImageDraw

    cols = 3
    n_rows = -(-len(PLOTTED) // cols)
    img = Image.new("RGB", (cols * panel_w, n_rows * panel_h), "white")
    draw = ImageDraw.Draw(img)
    palette = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193),
               (255, 112, 67), (120, 144, 156)]
    for p, key in enumerate(PLOTTED):
        x0, y0 = (p % cols) * panel_w, (p // cols) * panel_h
        header = dict((k, h) for k, h, _ in COLUMNS)[key]
        if key == "fid":
            header = f"FID ({rows[0]['fid_features']}) ↓"
        # PIL's built-in font has no arrows: spell the direction out.
        title = header.replace(" ↓", " (lower is better)").replace(" ↑", " (higher is better)")
        draw.text((x0 + 8, y0 + 6), title, fill="black")
        values = [r.get(key) for r in rows]
        top = max([v for v in values if v is not None] + [1e-12])
        bar_h = max(6, (panel_h - 40) // max(len(rows), 1) - 4)
        for i, (r, v) in enumerate(zip(rows, values)):
            y = y0 + 28 + i * (bar_h + 4)
            draw.text((x0 + 4, y), r["method"][:14], fill="black")
            if v is None:
                draw.text((x0 + 100, y), "n/a", fill="gray")
                continue
            width = int((panel_w - 160) * v / top)
            draw.rectangle([x0 + 100, y, x0 + 100 + width, y + bar_h - 2], fill=palette[i % len(palette)])
            draw.text((x0 + 104 + width, y), f"{v:.3g}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["COLUMNS", "markdown_table", "write_report", "bar_charts"]
