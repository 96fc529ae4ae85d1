"""Which code a result was made with: the git commit and whether the tree had uncommitted changes.

Read it when a run starts, not when it writes: a tree edited (or a commit made) while a long run
trains would otherwise be credited with numbers it did not make.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def git_commit(repo: Path = REPO) -> dict:
    """{"id": sha or None, "dirty": bool or None}; "error" says why when git cannot tell (no git, an sdist)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        return {"id": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except Exception as exc:  # no git, or not a checkout
        return {"id": None, "dirty": None, "error": f"{type(exc).__name__}: {exc}"}


def commit_label(commit: dict) -> str:
    """``abc1234``, ``abc1234-dirty`` or ``unknown``."""
    if not commit.get("id"):
        return "unknown"
    return commit["id"][:7] + ("-dirty" if commit.get("dirty") else "")


__all__ = ["git_commit", "commit_label"]
