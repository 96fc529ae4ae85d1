"""scripts/fault_injection.py at its smallest: one kill -9 mid-run, resume bit-exact, a NaN teacher
stopped with nothing written, an infinite lr refused. The full count lives in docs/faults/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_injection.py"


@pytest.mark.slow
def test_one_kill_resumes_bit_exact_and_bad_runs_stop(tmp_path):
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "faults.json"
    assert module.main(["--trials", "1", "--steps", "4", "--out", str(out)]) == 0, out.read_text()
