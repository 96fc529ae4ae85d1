"""Atomic safetensors + JSON files: a save interrupted at any point never leaves a half file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A model directory or checkpoint file is missing, incomplete or unreadable."""


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700; what we write is a model or a report others read, so it gets the
# mode open()/mkdir would give (minus the umask), read once at import (os.umask is process-wide).
_UMASK = _read_umask()
_FILE_MODE = 0o666 & ~_UMASK


def staging_dir(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A new hidden folder beside ``path`` to build it in before the rename that publishes it.

    mkdtemp makes it 0700; it gets the mode mkdir would give, so the published folder is as
    readable as any other the user makes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{tag}-", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Raise ValueError (naming the option and the reason) unless ``path`` can become a folder we write.

    Creates nothing, so a run refused later for another reason leaves no empty folder behind;
    called before any long work, so a file in the way or a read-only parent stops the run at its
    start instead of after training.
    """
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{what} {str(path)!r}: a file is in the way ({str(existing)!r} must be a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r} is not writable (no write permission on {str(existing)!r})")
    return path


# Every model folder this library writes carries this sidecar; a folder without it is the user's.
OWN_FOLDER_MARKER = "sfd_fast.json"


def check_replaceable(path: str | os.PathLike, what: str = "--out", overwrite: bool = False) -> Path:
    """Raise ValueError unless a model folder may be written at ``path`` without deleting the user's files.

    Allowed: nothing there, an empty folder, or a folder this library wrote (it holds
    ``sfd_fast.json``); with ``overwrite``, any folder. Never a file. Checked before training
    (the CLI) and again right before the old folder is replaced (``replace_dir``).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return check_writable_dir(path, what)
    if not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; give a folder path (the file is left as it is)")
    if overwrite or (path / OWN_FOLDER_MARKER).is_file() or not any(path.iterdir()):
        return check_writable_dir(path, what)
    flag = "--overwrite" if what.startswith("--") else "overwrite=True"
    raise ValueError(f"{what} {str(path)!r} is a non-empty folder that sfd_fast did not write (no "
                     f"{OWN_FOLDER_MARKER}); refusing to replace it - choose another path, or pass {flag} "
                     "to replace it and everything in it")


def replace_dir(tmp: Path, path: Path, overwrite: bool = False) -> None:
    """Move a finished temp directory onto ``path`` so readers never see a half-written one.

    Replaces only what this library wrote (``check_replaceable``): a user's folder is never deleted.
    """
    check_replaceable(path, "the model folder", overwrite=overwrite)
    # Writers we call stage through mkstemp too (safetensors 0.8's save_file, under diffusers'
    # save_pretrained, leaves its weights 0600): a published model is one others read.
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(_FILE_MODE)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors file with an optional JSON-serialisable metadata dict, written atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"json": json.dumps(metadata)} if metadata is not None else None
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) from a file written by ``save_tensors``; clear error if broken."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated: {exc}") from exc
    return tensors, json.loads(meta["json"]) if "json" in meta else {}


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object (dict) in ``path``; CheckpointError naming ``what`` and the file otherwise.

    ``what`` says whose file it is ("--config", "the teacher's sidecar"): a folder, an unreadable
    file, bad JSON or a JSON list all become one line that names the file, never a traceback.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{what} {str(path)!r} is a folder; expected a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {str(path)!r} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {str(path)!r} must hold a JSON object {{...}}, got a {type(data).__name__}")
    return data


def write_json(data: dict, path: str | Path) -> Path:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return Path(path)
