"""Full, resumable SFDState checkpoints: safetensors + JSON, verified before anything is loaded.

A checkpoint is a directory ``<root>/step-<8 digits>/`` holding

- ``state.safetensors``: fake score, generator and EMA weights; both optimizers' tensors
  (``opt_<name>/<param index>/<key>``); every rank's RNG states (the state's torch.Generator,
  the global CPU generator, each CUDA device's); the fault counters;
- ``state.json``: step, images_seen, world size, config, the optimizers' param groups and
  non-tensor state, and the size and sha256 of ``state.safetensors``;
- ``manifest.json`` (written last): the size and sha256 of every other file, so an edit of
  ``state.json`` (step, lr, images_seen) is caught like a damaged weight file.

The directory is built under a temporary name and renamed into place, so a crash mid-save
never leaves a half checkpoint (and the next save removes temporary folders a kill left).
Loading checks every file's size and hash, the metadata's structure, config, world size, every
tensor's name and shape, the optimizers' parameter groups and the RNG states *before* touching
the state: a truncated, edited or foreign file is refused with ``CheckpointError`` and the
state is left as it was. ``resume_latest`` falls back to the newest checkpoint that verifies.
Nothing is unpickled.
Collective: in a distributed run every rank calls ``save_checkpoint`` (RNG states are
gathered) and rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..core import faults
from ..core.config import SFDConfig
from ..io.atomic import CheckpointError, atomic_write_bytes, staging_dir
from . import distributed as dist_utils

FORMAT = "sfd_fast.train.checkpoint"
VERSION = 2  # 2: manifest.json over every file; 1 (still read): weights hash inside state.json only
WEIGHTS_FILE = "state.safetensors"
META_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
_TMP_DIR = re.compile(r"^\.step-\d{8,}\.tmp-")
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
    if getattr(state, "dropout_rng", None) is not None:  # config.train_dropout's mask generator
        local["dropout"] = state.dropout_rng.get_state()
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
    bad = faults.nonfinite_modules(state)  # every rank: the weights are replicated (DDP)
    if bad:
        last = latest_checkpoint(root)
        raise faults.NonFiniteError(f"refusing to checkpoint step {state.step}: the {', '.join(bad)} weights are "
                                    f"non-finite; the last good checkpoint is {last if last else '(none)'}")
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
        "lora": _lora_meta(state),
        "weights": {"file": WEIGHTS_FILE, **_record(blob)},
    }
    meta_bytes = json.dumps(meta, indent=1, sort_keys=True).encode()
    manifest = {"format": FORMAT, "version": VERSION, "files": {WEIGHTS_FILE: _record(blob), META_FILE: _record(meta_bytes)}}
    final = checkpoint_dir(root, state.step)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent)
    tmp = staging_dir(final)
    try:
        atomic_write_bytes(tmp / WEIGHTS_FILE, blob)
        atomic_write_bytes(tmp / META_FILE, meta_bytes)
        atomic_write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode())
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


def _lora_meta(state) -> dict | None:
    """The state's LoRA mode (core/lora.py) as JSON, None for full fine-tuning. ``fused`` is left out: both
    evaluations compute the same step, so a run may resume with the other one."""
    lora = getattr(state, "lora", None)
    return None if lora is None else {k: v for k, v in lora.to_dict().items() if k != "fused"}


def _record(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _remove_stale_temporaries(root: Path) -> None:
    """Delete half-written ``.step-*.tmp-*`` folders that a kill during a save left behind.

    Only rank 0 saves, one checkpoint at a time, so no other writer can own one.
    """
    for p in root.iterdir():
        if _TMP_DIR.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _verified_bytes(file: Path, recorded: dict) -> bytes:
    """The file's bytes if its size and sha256 are the recorded ones, else CheckpointError."""
    if not file.is_file():
        raise CheckpointError(f"{str(file)!r} is missing")
    data = file.read_bytes()
    if len(data) != recorded["bytes"]:
        raise CheckpointError(f"{str(file)!r} has {len(data)} bytes but the checkpoint recorded "
                              f"{recorded['bytes']}: truncated or replaced; nothing was loaded")
    digest = hashlib.sha256(data).hexdigest()
    if digest != recorded["sha256"]:
        raise CheckpointError(f"{str(file)!r} sha256 {digest} does not match the recorded "
                              f"{recorded['sha256']}: corrupted or edited; nothing was loaded")
    return data


def _json(data: bytes, where: Path):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(where)!r} is corrupt or truncated: {exc}") from exc


def _check_structure(meta, where: Path) -> None:
    """The fields load_checkpoint reads, with their types: a foreign or hand-made state.json is refused."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{str(where)!r} is not a valid checkpoint: {what}; nothing was loaded")

    need(isinstance(meta, dict), f"expected a JSON object, got {type(meta).__name__}")
    need(meta.get("format") == FORMAT and meta.get("version") in (1, VERSION),
         f"not an {FORMAT} v1/v{VERSION} file (format={meta.get('format')!r}, version={meta.get('version')!r})")
    for key in ("step", "images_seen", "world_size"):
        need(type(meta.get(key)) is int and meta[key] >= 0, f"{key} must be an integer >= 0, got {meta.get(key)!r}")
    need(isinstance(meta.get("config"), dict), "config must be a JSON object")
    need(isinstance(meta.get("weights"), dict) and {"bytes", "sha256"} <= set(meta["weights"]),
         "weights must record bytes and sha256")
    optimizers = meta.get("optimizers")
    need(isinstance(optimizers, dict) and set(OPTIMIZERS) <= set(optimizers), f"optimizers must hold {list(OPTIMIZERS)}")
    for name in OPTIMIZERS:
        part = optimizers[name]
        need(isinstance(part, dict) and isinstance(part.get("param_groups"), list)
             and isinstance(part.get("non_tensor_state"), dict), f"optimizers.{name} is malformed")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors on CPU, metadata) of a checkpoint directory, after every size, hash and structure check."""
    path = Path(path)
    meta_file, weights_file, manifest_file = path / META_FILE, path / WEIGHTS_FILE, path / MANIFEST_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint directory: {META_FILE} is missing")
    if manifest_file.is_file():
        manifest = _json(manifest_file.read_bytes(), manifest_file)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or {META_FILE, WEIGHTS_FILE} - set(files):
            raise CheckpointError(f"{str(manifest_file)!r} does not list {META_FILE} and {WEIGHTS_FILE}; "
                                  "nothing was loaded")
        meta = _json(_verified_bytes(meta_file, files[META_FILE]), meta_file)
        _check_structure(meta, meta_file)
        blob = _verified_bytes(weights_file, files[WEIGHTS_FILE])
    else:
        meta = _json(meta_file.read_bytes(), meta_file)
        _check_structure(meta, meta_file)
        if meta["version"] != 1:
            raise CheckpointError(f"{str(manifest_file)!r} is missing (a v{meta['version']} checkpoint has one); "
                                  "nothing was loaded")
        blob = _verified_bytes(weights_file, meta["weights"])  # v1: state.json itself is not covered
    from safetensors.torch import load
    try:
        return load(blob), meta  # the verified bytes themselves, not a second read of the file
    except Exception as exc:  # safetensors raises its own error types on bytes that are not its format
        raise CheckpointError(f"{str(weights_file)!r} is not a safetensors file ({type(exc).__name__}: {exc}); "
                              "nothing was loaded") from exc


def resume_latest(root: str | os.PathLike, state) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Load the newest checkpoint under ``root`` that verifies; older ones stand in for damaged ones.

    Returns (the checkpoint loaded or None, [(skipped newer checkpoint, why)]). Only damage
    (files, hashes, structure) falls back; a checkpoint of another config or world size raises,
    since every checkpoint of the same run would.
    """
    skipped = []
    for path in reversed(list_checkpoints(root)):
        try:
            tensors, meta = read_checkpoint(path)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            continue
        _restore(path, state, tensors, meta)
        return path, skipped
    return None, skipped


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
    return _restore(path, state, tensors, meta)


def _rng_is_usable(t: torch.Tensor, like: torch.Tensor) -> bool:
    return t.dtype == torch.uint8 and t.shape == like.shape


def check_saved_config(path: Path, meta: dict, state, meta_file: str = META_FILE) -> None:
    """CheckpointError naming each differing field unless the checkpoint's config is ``state.config``."""
    try:
        saved_cfg = SFDConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r}: its config is not valid ({exc}); nothing was loaded") from exc
    if saved_cfg != state.config:
        diff = {k: (v, getattr(state.config, k)) for k, v in saved_cfg.to_dict().items()
                if v != getattr(state.config, k)}
        raise CheckpointError(f"{str(path)!r} was written with a different config; (saved, current) per field: "
                              f"{diff}; resume with the saved config ({meta_file}) or start a new run")


def set_rng_states(state, rng: dict[str, torch.Tensor]) -> None:
    """Put this rank's saved RNG states (``_rng_tensors``' keys) back: state, dropout, torch CPU, CUDA."""
    state.rng.set_state(rng["state"])
    if getattr(state, "dropout_rng", None) is not None and "dropout" in rng:
        state.dropout_rng.set_state(rng["dropout"])
    torch.set_rng_state(rng["torch_cpu"])
    cuda = sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in cuda])


def _restore(path: Path, state, tensors: dict, meta: dict) -> dict:
    """load_checkpoint after read_checkpoint: every check first, then mutate ``state``."""
    check_saved_config(path, meta, state)
    saved_lora, lora = meta.get("lora"), _lora_meta(state)
    if saved_lora != (None if lora is None else json.loads(json.dumps(lora))):
        def what(x):
            return "full fine-tuning (no LoRA)" if x is None else f"LoRA {x}"
        raise CheckpointError(f"{str(path)!r} was written with {what(saved_lora)}, this state has {what(lora)}; "
                              "create the state with the same lora=LoRAConfig(...) (or none) to resume")
    world, r = dist_utils.world_size(), dist_utils.rank()
    if meta["world_size"] != world:
        raise CheckpointError(f"{str(path)!r} was written by {meta['world_size']} ranks, this run has {world}; "
                              "bit-exact resume needs the same world size")
    modules = {mod: _check_module(tensors, mod, getattr(state, mod), path) for mod in MODULES}
    opt_dicts = {name: _optimizer_state_dict(tensors, meta, name) for name in OPTIMIZERS}
    for name, sd in opt_dicts.items():
        current = getattr(state, name).param_groups
        sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in sd["param_groups"]]
        if sizes != [len(g["params"]) for g in current]:
            raise CheckpointError(f"{str(path)!r}: {name} has parameter groups of sizes {sizes}, this run's have "
                                  f"{[len(g['params']) for g in current]}; nothing was loaded")
    rng = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rng/rank{r}/")}
    if "state" not in rng or "torch_cpu" not in rng:
        raise CheckpointError(f"{str(path)!r} has no RNG state for rank {r}; nothing was loaded")
    current_rng = {"state": state.rng.get_state(), "torch_cpu": torch.get_rng_state()}
    if getattr(state, "dropout_rng", None) is not None:
        current_rng["dropout"] = state.dropout_rng.get_state()
    if torch.cuda.is_available():
        current_rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for key, like in current_rng.items():
        if key in rng and not _rng_is_usable(rng[key], like):
            raise CheckpointError(f"{str(path)!r}: RNG state {key!r} has dtype {rng[key].dtype} and shape "
                                  f"{tuple(rng[key].shape)}, expected uint8 {tuple(like.shape)}; nothing was loaded")

    # Everything is verified: now mutate.
    device = state.device
    for mod, sd in modules.items():
        dist_utils.unwrap(getattr(state, mod)).load_state_dict({k: v.to(device) for k, v in sd.items()})
    for name, sd in opt_dicts.items():
        getattr(state, name).load_state_dict(sd)
    set_rng_states(state, rng)
    fault_tensors = {k[len("faults/"):]: v for k, v in tensors.items() if k.startswith("faults/")}
    faults.monitor(state).load_tensors(fault_tensors)
    state.step, state.images_seen = int(meta["step"]), int(meta["images_seen"])
    return meta
