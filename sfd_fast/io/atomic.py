"""Atomic safetensors + JSON files: a save interrupted at any point never leaves a half file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A model directory or checkpoint file is missing, incomplete or unreadable."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
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


def write_json(data: dict, path: str | Path) -> Path:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return Path(path)
