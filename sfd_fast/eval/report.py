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
    ("nfe", "NFE", "{:.0f}"),
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
    if value is None:
        return "–"
    spread = row.get(f"{key}_spread")  # over training seeds (eval.compare.summarize_seeds)
    return fmt.format(value) + ("" if spread is None or key in ("nfe",) else " ± " + fmt.format(spread))


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
    floor = meta.get("noise_floor")
    if floor:
        md[3:3] = ["", f"Mean ± half the range over training seeds {floor['seeds']} (evaluation noise fixed). "
                   + (f"Noise floor, plain SiD seed against seed: retention {floor['sid_retention_seed_vs_seed']:.4f}, "
                      f"FID ± {floor['sid_fid_spread']:.2f}; gaps below these are not differences."
                      if "sid_retention_seed_vs_seed" in floor else "")]
    atomic_write_bytes(paths["md"], "\n".join(md).encode())
    atomic_write_bytes(paths["json"], (json.dumps({"rows": rows, "meta": meta}, indent=2) + "\n").encode())
    buf = io.StringIO()
    writer = csv.writer(buf)
    keys = [k for k, _, _ in COLUMNS] + ["fid_features", "retention_features", "unlearning_accuracy"]
    keys += [f"{k}_spread" for k, _, _ in COLUMNS if f"{k}_spread" in rows[0]]
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


def line_chart(series: dict[str, list[tuple[float, float]]], levels: dict[str, float], title: str,
               x_label: str, width: int = 640, height: int = 400) -> bytes:
    """Lines of (x, y) points per series and dashed horizontal ``levels`` (e.g. teacher, real-data floor),
    y on a log scale (FIDs span decades); PNG bytes."""
    import math

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 150, 30, height - 40
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts] + list(levels.values())
    ys = [y for y in ys if y > 0]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    y_lo, y_hi = math.log10(min(ys)) - 0.05, math.log10(max(ys)) + 0.05

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (math.log10(max(y, 1e-12)) - y_lo) / (y_hi - y_lo) * (bottom - top))

    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    for e in range(math.floor(y_lo), math.ceil(y_hi) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if y_lo <= math.log10(v) <= y_hi:
                y = px(x_lo, v)[1]
                draw.line([left, y, right, y], fill=(225, 225, 225))
                draw.text((8, y - 6), f"{v:g}", fill="black")
    for x in sorted(set(xs)):
        draw.text((px(x, 1)[0] - 8, bottom + 6), f"{x:g}", fill="black")
    draw.text(((left + right) // 2 - 20, height - 18), x_label, fill="black")
    palette = [(66, 133, 244), (219, 68, 55), (15, 157, 88), (244, 180, 0), (171, 71, 188)]
    legend_y = top
    for i, (name, pts) in enumerate(series.items()):
        colour = palette[i % len(palette)]
        coords = [px(x, y) for x, y in sorted(pts)]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        draw.line([right + 10, legend_y + 6, right + 30, legend_y + 6], fill=colour, width=2)
        draw.text((right + 34, legend_y), name, fill="black")
        legend_y += 16
    for name, value in levels.items():
        y = px(x_lo, value)[1]
        for x in range(left, right, 12):
            draw.line([x, y, x + 6, y], fill="gray", width=1)
        draw.line([right + 10, legend_y + 6, right + 30, legend_y + 6], fill="gray")
        draw.text((right + 34, legend_y), f"{name} {value:.3g}", fill="black")
        legend_y += 16
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["COLUMNS", "markdown_table", "write_report", "bar_charts", "line_chart"]
