"""The commit a result records: id + dirty flag in a checkout, an explained None outside one."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from sfd_fast.io.provenance import REPO, commit_label, git_commit


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_a_checkout_gives_the_head_commit_and_whether_tracked_files_changed(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f.txt").write_text("a")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    clean = git_commit(tmp_path)
    assert len(clean["id"]) == 40 and clean["dirty"] is False
    assert commit_label(clean) == clean["id"][:7]
    (tmp_path / "f.txt").write_text("b")
    assert git_commit(tmp_path)["dirty"] is True and commit_label(git_commit(tmp_path)).endswith("-dirty")
    (tmp_path / "new.txt").write_text("untracked files do not count")
    subprocess.run([*git, "checkout", "-q", "f.txt"], check=True)
    assert git_commit(tmp_path)["dirty"] is False


def test_outside_a_checkout_the_commit_is_unknown_with_the_reason(tmp_path):
    result = git_commit(tmp_path)
    assert result["id"] is None and result["dirty"] is None and result["error"]
    assert commit_label(result) == "unknown"
