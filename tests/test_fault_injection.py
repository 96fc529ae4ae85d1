"""scripts/fault_injection.py at its smallest: one kill -9 mid-run, resume bit-exact, a NaN teacher
stopped with nothing written, an infinite lr refused. The full count lives in docs/faults/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_injection.py"


@pytest.fixture(scope="module")
def fault_injection():
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_one_kill_resumes_bit_exact_and_bad_runs_stop(fault_injection, tmp_path):
    out = tmp_path / "faults.json"
    assert fault_injection.main(["--trials", "1", "--steps", "4", "--out", str(out)]) == 0, out.read_text()


def test_bad_arguments_exit_2_naming_them(fault_injection, capsys):
    with pytest.raises(SystemExit) as exc:
        fault_injection.main(["--steps", "1"])
    assert exc.value.code == 2 and "--steps >= 2" in capsys.readouterr().err
