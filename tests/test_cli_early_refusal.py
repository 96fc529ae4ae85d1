"""distill refuses an unusable --out / --checkpoint-dir / --keep-last before training (issue 19):
exit 2, one line, nothing written. Before, a file in the way was found after the run ended."""

from __future__ import annotations

import pytest

from sfd_fast.cli.main import main


@pytest.fixture
def teacher(tmp_path, tiny_teacher):
    from sfd_fast import save_denoiser

    return save_denoiser(tiny_teacher, tmp_path / "teacher")


@pytest.mark.parametrize("extra, message", [
    (["--keep-last", "0"], "--keep-last must be >= 1, got 0"),
    (["--keep-last", "-1"], "--keep-last must be >= 1, got -1"),
])
def test_bad_keep_last(tmp_path, teacher, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["distill", "--teacher", str(teacher), "--out", str(out), "--steps", "1", *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"sfd-fast distill: error: {message}"]
    assert not out.exists()


@pytest.mark.parametrize("option", ["--out", "--checkpoint-dir"])
def test_a_file_in_the_way_is_refused_before_training(tmp_path, teacher, capsys, option):
    blocker = tmp_path / "taken"
    blocker.write_text("user data")
    paths = {"--out": str(tmp_path / "out"), "--checkpoint-dir": str(tmp_path / "ckpt")}
    paths[option] = str(blocker / "sub")
    argv = ["distill", "--teacher", str(teacher), "--steps", "100000", "--no-progress"]
    for name, value in paths.items():
        argv += [name, value]
    assert main(argv) == 2  # 100000 steps: a check after training would time the test out
    assert f"{option} " in capsys.readouterr().err and blocker.read_text() == "user data"
