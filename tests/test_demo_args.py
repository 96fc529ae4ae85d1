"""sfd-fast demo refuses bad numbers and an unwritable --out at once, before any training (issue 19)."""

from __future__ import annotations

import os

import pytest

from sfd_fast.cli.main import main


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--steps", "-3"], "steps must be an integer >= 1, got -3"),
    (["--per-class", "0"], "per_class must be an integer >= 1, got 0"),
    (["--teacher-steps", "0"], "teacher_steps must be an integer >= 1, got 0"),
])
def test_bad_numbers_exit_2_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sfd-fast demo: error: {message}"]
    assert not out.exists(), "nothing is written for a refused run"


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("user data")
    assert main(["demo", "--out", str(blocker / "sub")]) == 2
    assert "a file is in the way" in capsys.readouterr().err
    assert main(["demo", "--out", str(blocker)]) == 2
    assert blocker.read_text() == "user data"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: permissions cannot be tested as root")
def test_unwritable_out_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["demo", "--out", str(locked)]) == 2
    assert "is not writable" in capsys.readouterr().err
