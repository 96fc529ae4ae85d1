"""Full, resumable SFDState checkpoints: safetensors + JSON, verified before anything is loaded.

A checkpoint is a directory ``<root>/step-<8 digits>/`` holding

- ``state.safetensors``: fake score, generator and EMA weights; both optimizers' tensors
  (``opt_<name>/<param index>/<key>``); every rank's RNG states (the state's torch.Generator,
  the global CPU generator, each CUDA device's); the fault counters;
- ``state.json``: step, images_seen, world size, config, the optimizers' param groups and
  non-tensor state, and the size and sha256 of ``state.safetensors``.

The directory is built under a temporary name and renamed into place, so a crash mid-save
never leaves a half checkpoint. Loading checks size, hash, config, world size and every
tensor's name and shape *before* touching the state: a truncated or tampered file is refused
with ``CheckpointError`` and the state is left as it was. Nothing is unpickled.
Collective: in a distributed run every rank calls ``save_checkpoint`` (RNG states are
gathered) and rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..core import faults
from ..core.config import SFDConfig
from ..io.atomic import CheckpointError, atomic_write_bytes
from . import distributed as dist_utils

FORMAT = "sfd_fast.train.checkpoint"
VERSION = 1
WEIGHTS_FILE = "state.safetensors"
META_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
MODULES = ("fake", "generator", "generator_ema")
OPTIMIZERS = {"opt_fake": "fake", "opt_gen": "generator"}


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first (temporary ones ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dist_utils.unwrap(module).state_dict()


def _rng_tensors(state) -> dict[str, torch.Tensor]:
    """Every rank's RNG states (gathered: all ranks must call this together)."""
    local = {"state": state.rng.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            local[f"cuda{i}"] = s
    out = {}
    for key in sorted(local):
        for r, t in enumerate(dist_utils.gather_uint8(local[key])):
            out[f"rng/rank{r}/{key}"] = t
    return out


def _optimizer_parts(opt: torch.optim.Optimizer, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, extra = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{idx}/{key}"] = value
            else:
                extra.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "non_tensor_state": extra}


def save_checkpoint(state, root: str | os.PathLike, keep_last: int | None = None) -> Path | None:
    """Write the full state to ``root/step-<step>/``; keep only the newest ``keep_last``.

    Returns the directory on rank 0, None on other ranks. Collective in a distributed run.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
    if any(getattr(p, "placements", None) is not None for p in state.generator.parameters()):
        raise CheckpointError("checkpoints of FSDP-sharded states are not supported yet; use mode='ddp' "
                              "(see docs/distributed.md, limits)")
    tensors = _rng_tensors(state)  # collective: before the rank-0-only part
    if not dist_utils.is_main():
        dist_utils.barrier()
        return None
    for mod in MODULES:
        tensors.update({f"{mod}/{k}": v for k, v in _module_state(getattr(state, mod)).items()})
    optimizers = {}
    for name in OPTIMIZERS:
        opt_tensors, optimizers[name] = _optimizer_parts(getattr(state, name), name)
        tensors.update(opt_tensors)
    tensors.update({f"faults/{k}": v for k, v in faults.monitor(state).tensors().items()})

    from safetensors.torch import save
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    meta = {
        "format": FORMAT, "version": VERSION, "step": state.step, "images_seen": state.images_seen,
        "world_size": dist_utils.world_size(), "config": state.config.to_dict(), "optimizers": optimizers,
        "weights": {"file": WEIGHTS_FILE, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()},
    }
    final = checkpoint_dir(root, state.step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        atomic_write_bytes(tmp / WEIGHTS_FILE, blob)
        atomic_write_bytes(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()
    return final


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors on CPU, metadata) of a checkpoint directory, after the size and sha256 checks."""
    path = Path(path)
    meta_file, weights_file = path / META_FILE, path / WEIGHTS_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint directory: {META_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(meta_file)!r} is corrupt or truncated: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{str(meta_file)!r} is not an {FORMAT} v{VERSION} file "
                              f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    if not weights_file.is_file():
        raise CheckpointError(f"{str(weights_file)!r} is missing")
    blob = weights_file.read_bytes()
    expected = meta["weights"]
    if len(blob) != expected["bytes"]:
        raise CheckpointError(f"{str(weights_file)!r} has {len(blob)} bytes but the checkpoint recorded "
                              f"{expected['bytes']}: truncated or replaced; nothing was loaded")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != expected["sha256"]:
        raise CheckpointError(f"{str(weights_file)!r} sha256 {digest} does not match the recorded "
                              f"{expected['sha256']}: corrupted or tampered; nothing was loaded")
    from safetensors.torch import load
    return load(blob), meta  # the verified bytes themselves, not a second read of the file


def _check_module(tensors: dict, prefix: str, module: torch.nn.Module, where: Path) -> dict[str, torch.Tensor]:
    current = _module_state(module)
    saved = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unexpected:
        raise CheckpointError(f"{str(where)!r}: {prefix} weights do not match this model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}); nothing was loaded")
    for k, v in current.items():
        if saved[k].shape != v.shape:
            raise CheckpointError(f"{str(where)!r}: {prefix}/{k} has shape {tuple(saved[k].shape)}, the model "
                                  f"has {tuple(v.shape)}; nothing was loaded")
    return saved


def _optimizer_state_dict(tensors: dict, meta: dict, name: str) -> dict:
    parts = meta["optimizers"][name]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(name + "/"):
            _, idx, field = key.split("/", 2)
            state.setdefault(int(idx), {})[field] = value
    for idx, extra in parts["non_tensor_state"].items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": parts["param_groups"]}


def load_checkpoint(path: str | os.PathLike, state) -> dict:
    """Restore ``state`` in place from a checkpoint directory; returns its metadata.

    The next ``train_step`` calls give bit-identical results to a run that was never
    interrupted (same device, same world size). Raises CheckpointError, leaving ``state``
    untouched, if the files are damaged or belong to a different run.
    """
    path = Path(path)
    tensors, meta = read_checkpoint(path)
    saved_cfg = SFDConfig.from_dict(meta["config"])
    if saved_cfg != state.config:
        diff = {k: (v, getattr(state.config, k)) for k, v in saved_cfg.to_dict().items()
                if v != getattr(state.config, k)}
        raise CheckpointError(f"{str(path)!r} was written with a different config; (saved, current) per field: "
                              f"{diff}; resume with the saved config (state.json) or start a new run")
    world, r = dist_utils.world_size(), dist_utils.rank()
    if meta["world_size"] != world:
        raise CheckpointError(f"{str(path)!r} was written by {meta['world_size']} ranks, this run has {world}; "
                              "bit-exact resume needs the same world size")
    modules = {mod: _check_module(tensors, mod, getattr(state, mod), path) for mod in MODULES}
    opt_dicts = {name: _optimizer_state_dict(tensors, meta, name) for name in OPTIMIZERS}
    rng = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rng/rank{r}/")}
    if "state" not in rng or "torch_cpu" not in rng:
        raise CheckpointError(f"{str(path)!r} has no RNG state for rank {r}; nothing was loaded")

    # Everything is verified: now mutate.
    device = state.device
    for mod, sd in modules.items():
        dist_utils.unwrap(getattr(state, mod)).load_state_dict({k: v.to(device) for k, v in sd.items()})
    for name, sd in opt_dicts.items():
        getattr(state, name).load_state_dict(sd)
    state.rng.set_state(rng["state"])
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))
        torch.cuda.set_rng_state_all([rng[k] for k in cuda])
    fault_tensors = {k[len("faults/"):]: v for k, v in tensors.items() if k.startswith("faults/")}
    faults.monitor(state).load_tensors(fault_tensors)
    state.step, state.images_seen = int(meta["step"]), int(meta["images_seen"])
    return meta
