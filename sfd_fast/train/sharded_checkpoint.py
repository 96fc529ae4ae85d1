"""Sharded SFDState checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own
shards, any world size reads them back (2 -> 1, 1 -> 2, 2 -> 4 ranks, FSDP2, DDP or one process).

A checkpoint is a directory ``<root>/step-<8 digits>/`` (the same names as ``checkpoint.py``) holding

- the DCP files (``.metadata`` + ``__<rank>_<n>.distcp``): fake score, generator and EMA weights
  and both Adam states, keyed by parameter name (``get_model_state_dict`` /
  ``get_optimizer_state_dict``), so nothing depends on how the writer was sharded;
- ``host_state.safetensors`` (rank 0): every rank's RNG states and the fault counters;
- ``sharded.json``: format, step, images_seen, world size, config, the RNG rule on a new world size;
- ``manifest.json`` (written last, by rank 0): the size and sha256 of every other file.

Atomic: all ranks write into ``.step-<n>.tmp-<random>`` (rank 0 picks the name), rank 0 then
writes the manifest and renames the folder into place; a kill at any point leaves the previous
checkpoints as they were and at most a temporary folder, which the next save removes.
Verified on load: rank 0 checks every file's size and hash and the metadata before any rank
touches the state, and every tensor name and shape is checked against this run's state first.

RNG on resume. Same world size: every rank gets its saved streams back (bit-exact continuation).
Another world size: there is no way to split or merge per-rank noise streams, so they are
re-derived, deterministically, from the config seed and the step: rank r of the resumed run
seeds its state generator (and torch's global CPU/CUDA generators) with
``resume_seed(config.seed, step, r)``, and its dropout-mask generator (``config.train_dropout``)
with that seed plus ``SFDState``'s dropout offset. Resuming the same checkpoint twice at the same new world
size therefore gives the same run. Weights, Adam moments and step counts are restored exactly.
Only tensors go through DCP: non-tensor entries (the optimizers' param groups) would be
``torch.save`` pickles that DCP reads back with ``weights_only=False``; the hyperparameters come
from this run's config instead (checked equal). DCP's own ``.metadata`` index is a pickle too
(torch 2.13's FileSystemWriter): it is read only after its sha256 matched the manifest, and with
an unpickler that admits DCP's metadata classes and torch's size/dtype types and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from ..core import faults
from ..io.atomic import CheckpointError, atomic_write_bytes, staging_dir
from . import checkpoint as plain
from . import distributed as dist_utils

FORMAT = "sfd_fast.train.sharded_checkpoint"
VERSION = 1
META_FILE = "sharded.json"
MANIFEST_FILE = "manifest.json"
HOST_FILE = "host_state.safetensors"
MODULES = plain.MODULES                   # ("fake", "generator", "generator_ema")
OPTIMIZERS = plain.OPTIMIZERS             # {"opt_fake": "fake", "opt_gen": "generator"}
RNG_RULE = "same world size: saved per-rank streams; otherwise resume_seed(config.seed, step, rank)"


def resume_seed(seed: int, step: int, rank: int) -> int:
    """Seed of rank ``rank``'s streams when a checkpoint of step ``step`` resumes at another world size.

    Distinct from every ``rank_seed(seed, r)`` of a fresh run (the step enters through a large odd
    multiplier) and the same for every resume of that step at that rank.
    """
    return (dist_utils.rank_seed(seed, rank) + 0x9E3779B97F4A7C15 * (step + 1)) % (2 ** 63)


def _dropout_seed(seed: int) -> int:
    """The dropout-mask generator's seed beside a noise seed (``SFDState.create``'s offset)."""
    from ..core.state import DROPOUT_SEED_OFFSET

    return seed + DROPOUT_SEED_OFFSET


# --------------------------------------------------------------------------- listing

def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete sharded checkpoint directories under ``root``, oldest first (temporaries ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    step = re.compile(r"^step-(\d{8,})$")
    found = [p for p in root.iterdir() if step.match(p.name) and is_sharded_checkpoint(p)]
    return sorted(found, key=lambda p: int(step.match(p.name).group(1)))


# --------------------------------------------------------------------------- state dicts

def _state_dicts(state) -> dict:
    """{network/optimizer name: its DCP state dict} (DTensors under FSDP2, plain tensors otherwise)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from ..core.master_weights import MasterWeightAdam

    out = {mod: get_model_state_dict(dist_utils.unwrap(getattr(state, mod))) for mod in MODULES}
    for name, mod in OPTIMIZERS.items():
        opt = getattr(state, name)
        if isinstance(opt, MasterWeightAdam):
            raise CheckpointError(f"state.{name} keeps fp32 masters outside the module (trained_precision='bf16'), "
                                  "which sharded checkpoints do not map to parameter names; use the whole-state "
                                  "checkpoint (train/checkpoint.py), or FSDPOptions(param_dtype='bf16') under FSDP2")
        out[name] = get_optimizer_state_dict(dist_utils.unwrap(getattr(state, mod)), opt)
    return out


def _tensors_only(tree):
    """The tensor leaves of a nested dict (lists, numbers and strings dropped): what DCP stores."""
    if torch.is_tensor(tree):
        return tree
    if isinstance(tree, dict):
        kept = {k: _tensors_only(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None and (torch.is_tensor(v) or v)}
    return None


def _flat_tensor_shapes(state_dict: dict) -> dict[str, tuple[int, ...]]:
    """DCP's flattened key -> global shape of every tensor entry (what ``.metadata`` records)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state_dict)
    return {k: tuple(v.shape) for k, v in flat.items() if torch.is_tensor(v)}


# --------------------------------------------------------------------------- save

def _record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save/load without a process group that it assumes one process: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _broadcast(obj):
    """rank 0's ``obj`` on every rank (a collective; a small object: a path, an error string)."""
    if not dist_utils.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded_checkpoint(state, root: str | os.PathLike, keep_last: int | None = None) -> Path | None:
    """Write ``state`` to ``root/step-<step>/`` from every rank; keep only the newest ``keep_last``.

    Collective (every rank calls it). Returns the directory on rank 0, None on other ranks.
    Works for FSDP2-sharded, DDP and single-process states alike.
    """
    import torch.distributed.checkpoint as dcp

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
    # Every rank checks its own shards; the decision is agreed so that no rank waits in a collective alone.
    bad = faults.nonfinite_modules(state)
    if dist_utils.any_rank(bool(bad)):
        raise faults.NonFiniteError(f"refusing to checkpoint step {state.step}: the {', '.join(bad) or 'sharded'} "
                                    "weights are non-finite (on this rank or another); the last good checkpoint "
                                    f"is {(list_checkpoints(root) or ['(none)'])[-1]}")
    host = plain._rng_tensors(state)  # collective: every rank's streams, gathered
    host.update({f"faults/{k}": v for k, v in faults.monitor(state).tensors().items()})
    state_dicts = _state_dicts(state)  # collective under FSDP2 (optimizer state init)
    final = plain.checkpoint_dir(root, state.step)
    tmp = None
    if dist_utils.is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        plain._remove_stale_temporaries(final.parent)
        tmp = str(staging_dir(final))
    tmp = Path(_broadcast(tmp))
    try:
        # Collective; returns once .metadata is written.
        with _single_process_quiet():
            dcp.save(_tensors_only(state_dicts), checkpoint_id=str(tmp), no_dist=not dist_utils.is_initialized())
        dist_utils.barrier()
        if dist_utils.is_main():
            from safetensors.torch import save

            atomic_write_bytes(tmp / HOST_FILE, save({k: v.detach().contiguous().cpu() for k, v in host.items()}))
            meta = {"format": FORMAT, "version": VERSION, "step": state.step, "images_seen": state.images_seen,
                    "world_size": dist_utils.world_size(), "config": state.config.to_dict(), "rng": RNG_RULE}
            atomic_write_bytes(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
            files = {p.name: _record(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"format": FORMAT, "version": VERSION, "files": files}
            atomic_write_bytes(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if keep_last is not None:
                for old in list_checkpoints(root)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if dist_utils.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist_utils.barrier()
    return final if dist_utils.is_main() else None


# --------------------------------------------------------------------------- verify

def _verify(path: Path) -> dict:
    """The metadata of a sharded checkpoint after every file's size and sha256 check (one process)."""
    manifest_file, meta_file = path / MANIFEST_FILE, path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a sharded checkpoint: {META_FILE} is missing")
    if not manifest_file.is_file():
        raise CheckpointError(f"{str(path)!r}: {MANIFEST_FILE} is missing (a save that did not finish); "
                              "nothing was loaded")
    manifest = plain._json(manifest_file.read_bytes(), manifest_file)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or {META_FILE, HOST_FILE, ".metadata"} - set(files):
        raise CheckpointError(f"{str(manifest_file)!r} does not list {META_FILE}, {HOST_FILE} and .metadata; "
                              "nothing was loaded")
    on_disk = {p.name for p in path.iterdir() if p.is_file()} - {MANIFEST_FILE}
    if on_disk - set(files):
        raise CheckpointError(f"{str(path)!r} holds files the manifest does not list: {sorted(on_disk - set(files))}; "
                              "nothing was loaded")
    for name, recorded in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{str(file)!r} is missing; nothing was loaded")
        found = _record(file)
        if found["bytes"] != recorded.get("bytes"):
            raise CheckpointError(f"{str(file)!r} has {found['bytes']} bytes but the checkpoint recorded "
                                  f"{recorded.get('bytes')}: truncated or replaced; nothing was loaded")
        if found["sha256"] != recorded.get("sha256"):
            raise CheckpointError(f"{str(file)!r} sha256 {found['sha256']} does not match the recorded "
                                  f"{recorded.get('sha256')}: corrupted or edited; nothing was loaded")
    meta = plain._json(meta_file.read_bytes(), meta_file)
    ok = (isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("version") == VERSION
          and all(type(meta.get(k)) is int and meta[k] >= 0 for k in ("step", "images_seen", "world_size"))
          and isinstance(meta.get("config"), dict))
    if not ok:
        raise CheckpointError(f"{str(meta_file)!r} is not a valid {FORMAT} v{VERSION} file; nothing was loaded")
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """``sharded.json`` of a checkpoint, verified (rank 0 reads and hashes, every rank gets the result)."""
    path = Path(path)
    result = None
    if dist_utils.is_main():
        try:
            result = ("ok", _verify(path))
        except CheckpointError as exc:
            result = ("error", str(exc))
    kind, value = _broadcast(result)
    if kind == "error":
        raise CheckpointError(value)
    return value


# --------------------------------------------------------------------------- load

_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                     "torch.distributed.checkpoint.planner")


def _reader_class():
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            allowed = (module in _METADATA_MODULES
                       or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                               (torch.dtype, torch.layout,
                                                                                torch.memory_format))))
                       or (module, name) in (("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                                             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path"))
                       or (module == "builtins" and name in ("set", "frozenset", "slice")))
            if not allowed:
                raise CheckpointError(f"DCP .metadata refers to {module}.{name}, which a checkpoint index never "
                                      "holds: refusing to unpickle it")
            return super().find_class(module, name)

    class Reader(FileSystemReader):
        """DCP's reader with a restricted unpickler for ``.metadata`` (the only pickle it reads)."""

        def read_metadata(self, *args, **kwargs):
            import io

            from torch.distributed.checkpoint.metadata import StorageMeta

            if kwargs.get("rank") is not None:
                raise CheckpointError("per-rank DCP metadata files are not written by this module")
            with open(os.path.join(str(self.path), ".metadata"), "rb") as f:
                metadata = RestrictedUnpickler(io.BytesIO(f.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def _Reader(path: str):
    return _reader_class()(path)


def _saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    meta = _Reader(str(path)).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}


def load_sharded_checkpoint(path: str | os.PathLike, state, allow_reshard: bool = True) -> dict:
    """Restore ``state`` (any mode, any world size) from a sharded checkpoint; returns its metadata.

    Collective. Every check (files, hashes, metadata, config, tensor names and shapes) runs
    before the state is touched. ``allow_reshard=False`` refuses another world size than the
    writer's (then the continuation is bit-exact, as with the whole-state checkpoint).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    meta = read_metadata(path)
    plain.check_saved_config(path, meta, state, META_FILE)
    world, rank = dist_utils.world_size(), dist_utils.rank()
    if meta["world_size"] != world and not allow_reshard:
        raise CheckpointError(f"{str(path)!r} was written by {meta['world_size']} ranks, this run has {world}, and "
                              "allow_reshard=False; pass allow_reshard=True to re-shard (RNG streams are then "
                              "re-derived: see sfd_fast/train/sharded_checkpoint.py)")
    state_dicts = _state_dicts(state)
    wanted = _flat_tensor_shapes(_tensors_only(state_dicts))
    saved = _saved_shapes(path)
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks {len(missing)} tensors this state has (e.g. {missing[:3]}): "
                              "another model or optimizer; nothing was loaded")
    wrong = [(k, saved[k], s) for k, s in wanted.items() if saved[k] != s]
    if wrong:
        raise CheckpointError(f"{str(path)!r}: shapes differ from this state's (name, saved, current) "
                              f"{wrong[:3]}; nothing was loaded")
    from safetensors.torch import load as load_bytes

    host = load_bytes((path / HOST_FILE).read_bytes())  # its hash was checked by rank 0 just before
    same_world = meta["world_size"] == world
    rng = {k.rsplit("/", 1)[1]: v for k, v in host.items() if k.startswith(f"rng/rank{rank}/")}
    if same_world and ("state" not in rng or "torch_cpu" not in rng):
        raise CheckpointError(f"{str(path)!r} has no RNG state for rank {rank}; nothing was loaded")

    # Everything is verified: now mutate.
    loaded = _tensors_only(state_dicts)
    with _single_process_quiet():
        dcp.load(loaded, checkpoint_id=str(path), storage_reader=_Reader(str(path)),
                 no_dist=not dist_utils.is_initialized())
    for mod in MODULES:
        set_model_state_dict(dist_utils.unwrap(getattr(state, mod)), loaded[mod])
    for name, mod in OPTIMIZERS.items():  # this run's param groups (its config equals the saved one)
        sd = {"state": loaded[name].get("state", {}), "param_groups": state_dicts[name]["param_groups"]}
        set_optimizer_state_dict(dist_utils.unwrap(getattr(state, mod)), getattr(state, name), sd)
    step = int(meta["step"])
    if same_world:
        plain.set_rng_states(state, rng)
    else:
        seed = resume_seed(state.config.seed, step, rank)
        state.rng.manual_seed(seed)
        if getattr(state, "dropout_rng", None) is not None:  # config.train_dropout's masks
            state.dropout_rng.manual_seed(_dropout_seed(seed))
        torch.manual_seed(seed)  # the global CPU and CUDA generators (dropout, if any)
    faults.monitor(state).load_tensors({k[len("faults/"):]: v for k, v in host.items() if k.startswith("faults/")})
    state.step, state.images_seen = step, int(meta["images_seen"])
    return meta


# --------------------------------------------------------------------------- resume, either format

def resume_latest(root: str | os.PathLike, state) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Load the newest checkpoint under ``root`` that verifies, sharded or whole-state (``checkpoint.py``).

    Returns (the checkpoint loaded or None, [(skipped newer checkpoint, why)]), like
    ``checkpoint.resume_latest``: damage falls back to an older checkpoint; another config raises.
    A whole-state checkpoint needs this run's world size and an unsharded state.
    """
    candidates = sorted(set(list_checkpoints(root)) | set(plain.list_checkpoints(root)),
                        key=lambda p: p.name)
    skipped = []
    for path in reversed(candidates):
        try:
            if is_sharded_checkpoint(path):
                load_sharded_checkpoint(path, state)
            else:
                if dist_utils.is_sharded(state.generator):
                    raise CheckpointError(f"{str(path)!r} is a whole-state checkpoint and this state is FSDP2-"
                                          "sharded; load it before distribute_state(state, 'fsdp') (which "
                                          "shards the loaded weights and Adam state), or resume without FSDP")
                tensors, meta = plain.read_checkpoint(path)
                plain._restore(path, state, tensors, meta)
        except CheckpointError as exc:
            if "different config" in str(exc) or "ranks, this run has" in str(exc) or "FSDP2-sharded" in str(exc):
                raise
            skipped.append((path, str(exc)))
            continue
        return path, skipped
    return None, skipped


def save_checkpoint(state, root: str | os.PathLike, keep_last: int | None = None) -> Path | None:
    """The run loop's save: sharded (DCP) when the state is FSDP2-sharded or ``root`` already holds
    sharded checkpoints (a run resumed 2 -> 1 keeps its format), else the whole-state checkpoint."""
    if dist_utils.is_sharded(state.generator) or list_checkpoints(root):
        return save_sharded_checkpoint(state, root, keep_last)
    return plain.save_checkpoint(state, root, keep_last)


# --------------------------------------------------------------------------- converter

def export_generator(path: str | os.PathLike, out: str | os.PathLike, template, which: str = "generator_ema",
                     record=None) -> Path:
    """A sharded checkpoint's generator (EMA by default) as the plain generator folder
    (``models.networks.save_generator``: a diffusers OneStepPipeline with safetensors weights).

    One process, no process group. ``template``: a plain ``OneStepGenerator`` of the same
    architecture (e.g. ``OneStepGenerator(load_denoiser(teacher), config.sigma_init)``); its
    weights are replaced by the checkpoint's. Returns ``out``.
    """
    import torch.distributed.checkpoint as dcp

    from ..models.networks import save_generator

    if which not in ("generator", "generator_ema"):
        raise ValueError(f"which={which!r}; allowed: 'generator', 'generator_ema'")
    if dist_utils.is_initialized():
        raise RuntimeError("export_generator runs in one process; call it outside torchrun (or on rank 0 "
                           "after the group is destroyed)")
    path = Path(path)
    meta = _verify(path)
    wanted = {which: {k: v for k, v in template.state_dict().items()}}
    saved = _saved_shapes(path)
    shapes = _flat_tensor_shapes(wanted)
    bad = [k for k, s in shapes.items() if saved.get(k) != s]
    if bad:
        raise CheckpointError(f"{str(path)!r}: the template does not match the checkpoint's {which} "
                              f"(e.g. {bad[:3]}); build it from the run's teacher")
    run_sigma = meta["config"].get("sigma_init")
    if run_sigma is not None and float(template.sigma_init) != float(run_sigma):
        raise CheckpointError(f"the template's sigma_init {template.sigma_init} is not the run's {run_sigma}; "
                              "build it as OneStepGenerator(load_denoiser(teacher), config.sigma_init)")
    with _single_process_quiet():
        dcp.load(wanted, checkpoint_id=str(path), storage_reader=_Reader(str(path)), no_dist=True)
    template.load_state_dict(wanted[which])
    return save_generator(template.eval(), out, record=record)
