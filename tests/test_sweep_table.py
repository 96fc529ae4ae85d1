"""scripts/sweep_table.py: each run labelled by the settings it changes, ratios to the teacher."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep_table.py"
spec = importlib.util.spec_from_file_location("sweep_table", SCRIPT)
sweep_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep_table)


def _curve(fid: float, **sfd) -> dict:
    point = {"step": 400, "train_seconds": 12.0, "forget_accuracy": 0.0, "override_rate": 1.0, "remain_accuracy": 0.95,
             "classifier": {"fid": 2 * fid}, "independent": {"fid": fid, "mean_class_variance": 80.0}}
    return {"config": {"sfd": {"lr_gen": 3e-4, "ema_halflife_kimg": 0.5, "seed": 0, **sfd}},
            "teacher": {"independent": {"fid": 2.0, "mean_class_variance": 100.0}},
            "methods": {"sfd": {"points": [{**point, "step": 0}, point]}}}


def test_rows_name_what_changed_and_divide_by_the_teacher(tmp_path):
    base, longer = _curve(8.0), _curve(6.0, ema_halflife_kimg=5.0, seed=3)
    for name, curve in (("base", base), ("ema", longer)):
        (tmp_path / f"{name}.json").write_text(json.dumps(curve))
    assert sweep_table.main([str(tmp_path / "ema.json"), "--baseline", str(tmp_path / "base.json"),
                             "--baseline-label", "demo preset", "--out", str(tmp_path / "t.md")]) == 0
    rows = (tmp_path / "t.md").read_text().splitlines()[2:]
    assert rows[0].startswith("| demo preset | 16.00 | 8.00 | 4.00x | 0.80x |")
    assert rows[1].startswith("| ema_halflife_kimg=5.0 | 12.00 | 6.00 | 3.00x |")  # the seed is not a setting
    with pytest.raises(SystemExit, match="no SFD point at step 25"):
        sweep_table.table([longer], base, 25)


def test_each_row_divides_by_its_own_runs_teacher():
    """A run with another --seed or --teacher has its own teacher row (same noise as its generator):
    dividing it by the baseline's teacher mixed two evaluations."""
    base, other = _curve(8.0), _curve(6.0, seed=1)
    other["teacher"] = {"independent": {"fid": 3.0, "mean_class_variance": 60.0}}
    rows = sweep_table.table([other], base, 400).splitlines()[2:]
    assert rows[0].startswith("| baseline | 16.00 | 8.00 | 4.00x | 0.80x |")
    assert rows[1].startswith("| baseline | 12.00 | 6.00 | 2.00x | 1.33x |")
