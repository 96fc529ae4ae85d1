"""Data-parallel SFD with torch.distributed: process group setup, DDP/FSDP2 wrapping, reductions.

Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Every rank
holds its own ``SFDState``. "ddp": the frozen teacher is replicated and never wrapped (it gets no
gradients); the fake score and the generator are wrapped so their gradients are averaged across
ranks during ``backward()``. "fsdp": fake score, generator and EMA are FSDP2-sharded per UNet
block (``FSDPOptions``: teacher replicated/bf16/sharded, bf16 mixed precision, activation
checkpointing, CPU offload); see docs/distributed.md, "FSDP2". Each rank draws its own noise and labels (its state RNG is
seeded with ``rank_seed(config.seed, rank)``), so W ranks with per-rank batch b train like one
process with batch W*b (the losses are normalised per batch, and DDP averages gradients).
All helpers are no-ops in a single process, so the same loop runs with or without torchrun.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..core.ranks import comm_device, is_initialized  # noqa: F401  (part of this module's API)

log = logging.getLogger(__name__)
MODES = ("ddp", "fsdp")


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the only one that writes files and prints."""
    return rank() == 0


def rank_seed(seed: int, rank_: int) -> int:
    """Rank 0 keeps ``seed`` (so a 1-process run equals rank 0's stream); others get distinct seeds."""
    return seed + 1_000_003 * rank_


def init_from_env(backend: str | None = None, timeout_s: float = 1800, one_rank_group: bool = False) -> torch.device:
    """Join the process group torchrun describes (if any) and return this rank's device
    (cuda:LOCAL_RANK under NCCL, else CPU).

    backend: "nccl" | "gloo" | None (nccl when CUDA is available, else gloo).
    one_rank_group: also form a group of one under ``torchrun --nproc-per-node 1`` (WORLD_SIZE=1
    and MASTER_ADDR set), which FSDP2 needs; by default one rank runs without a group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = world > 1 or (one_rank_group and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)
    if wanted and not is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"unknown distributed backend {backend!r}; allowed: 'nccl', 'gloo'")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if is_initialized() and dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def shutdown(state=None) -> None:
    """Leave the process group. ``state``: its DDP wrappers are removed first, so that their
    reducers (which hold the group) are not torn down after it: with gloo that left a rank hanging
    at exit while rank 0, which hosts the store, was already gone."""
    if state is not None:
        state.fake, state.generator = unwrap(state.fake), unwrap(state.generator)
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def gather_uint8(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-sized uint8 tensor (e.g. an RNG state), as CPU tensors, on all ranks."""
    if not is_initialized():
        return [tensor.cpu()]
    local = tensor.to(comm_device())
    out = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [t.cpu() for t in out]


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is True on any rank (one tiny all-reduce and a host read)."""
    if not is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def reduce_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over ranks of float metrics and sum of integer counts, in one all-reduce.

    metrics: name -> 0-d tensor. Returns the same names, reduced (a collective: call on all ranks).
    """
    if not is_initialized() or not metrics:
        return metrics
    names = sorted(metrics)
    is_count = torch.tensor([not metrics[n].is_floating_point() for n in names], device=comm_device())
    packed = torch.stack([metrics[n].detach().double().to(comm_device()) for n in names])
    dist.all_reduce(packed)
    packed = torch.where(is_count, packed, packed / world_size())
    return {n: packed[i].to(metrics[n].dtype) for i, n in enumerate(names)}


class SFDDataParallel(nn.parallel.DistributedDataParallel):
    """DDP that steps aside while its parameters are frozen.

    In the generator step the fake score is evaluated with ``requires_grad`` off (gradients
    reach only its input). Routing that call through DDP would arm the reducer for gradients
    that never come; calling the wrapped module directly keeps DDP's bookkeeping to the steps
    that really train it.
    """

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled() or not self._first_param.requires_grad:
            return self.module(*args, **kwargs)
        return super().forward(*args, **kwargs)

    @property
    def _first_param(self) -> nn.Parameter:
        return next(self.module.parameters())


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (FSDP2 shards in place, nothing to unwrap)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def distribute_state(state, mode: str = "ddp", fsdp: "FSDPOptions | None" = None) -> None:
    """Make ``state`` a data-parallel rank: per-rank RNG, trained networks wrapped. In place.

    mode: "ddp" (replicated weights, gradients all-reduced; in a single process nothing changes)
    or "fsdp" (FSDP2 ``fully_shard`` of fake score, generator and EMA, options in ``fsdp``; needs
    an initialized process group, i.e. torchrun, even for one rank).
    """
    if mode not in MODES:
        raise ValueError(f"unknown distributed mode {mode!r}; allowed: {MODES}")
    if fsdp is not None and mode != "fsdp":
        raise ValueError(f"FSDPOptions were given with mode={mode!r}; they apply to mode='fsdp' only")
    if mode == "fsdp":
        if not is_initialized():
            raise RuntimeError("distributed mode 'fsdp' needs a torch.distributed process group: launch with "
                               "torchrun (or call init_from_env() under its environment) before "
                               "distribute_state(state, 'fsdp'); a single process without one uses mode='ddp'")
        _seed_rank_streams(state)
        _fully_shard_state(state, fsdp or FSDPOptions())
        return
    if not is_initialized():
        return
    _seed_rank_streams(state)
    device_ids = [state.device.index] if state.device.type == "cuda" else None
    # The UNets have no running statistics: nothing to broadcast before each forward.
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in _ddp_args() else {"broadcast_buffers": False}
    state.fake = SFDDataParallel(state.fake, device_ids=device_ids, **sync)
    state.generator = SFDDataParallel(state.generator, device_ids=device_ids, **sync)


def _seed_rank_streams(state) -> None:
    """Each rank its own noise stream, and its own dropout masks when ``config.train_dropout`` is set."""
    state.rng.manual_seed(rank_seed(state.config.seed, rank()))
    dropout = getattr(state, "dropout_rng", None)
    if dropout is not None:
        from ..core.state import DROPOUT_SEED_OFFSET

        dropout.manual_seed(rank_seed(state.config.seed, rank()) + DROPOUT_SEED_OFFSET)


def _ddp_args() -> set[str]:
    import inspect

    return set(inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters)


# --------------------------------------------------------------------------- FSDP2

TEACHER_MODES = ("replicate", "shard")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class FSDPOptions:
    """How ``distribute_state(state, "fsdp", options)`` shards the state (FSDP2 ``fully_shard``)."""

    teacher: str = "replicate"             # "replicate": every rank holds the frozen teacher; "shard": FSDP2 too
    teacher_dtype: str = "fp32"            # "bf16": the replicated teacher stored in bf16 (half its memory)
    param_dtype: str = "fp32"              # "bf16": MixedPrecisionPolicy compute in bf16, fp32 shards + reduce
    per_block: bool = True                 # one FSDP2 unit per UNet block (False: one per network, gathered whole)
    reshard_after_forward: bool = True     # free each block's gathered weights after its forward (re-gather in backward)
    activation_checkpointing: bool = False  # recompute activations per UNet block in backward (diffusers' checkpointing)
    cpu_offload: bool = False              # shards, gradients and Adam state on the host (CUDA runs only)

    def __post_init__(self):
        for name, allowed in (("teacher", TEACHER_MODES), ("teacher_dtype", PRECISIONS), ("param_dtype", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"FSDPOptions.{name}={getattr(self, name)!r}; allowed: {allowed}")
        if self.teacher == "shard" and self.teacher_dtype != "fp32":
            raise ValueError("FSDPOptions.teacher_dtype applies to a replicated teacher; a sharded one follows "
                             "param_dtype")


def _diffusers_unet(module: nn.Module) -> nn.Module | None:
    """The (first) diffusers UNet inside a denoiser: the module with down/up blocks."""
    for m in module.modules():
        if hasattr(m, "down_blocks") and hasattr(m, "up_blocks"):
            return m
    return None


def _shard_units(module: nn.Module) -> list[nn.Module]:
    """FSDP2 units of a denoiser, innermost first: each UNet block, the UNet (its stem, embeddings and
    head), then ``module`` itself (the root, which holds the fp32 EDM/DDPM preconditioning)."""
    unet = _diffusers_unet(module)
    if unet is None:  # a diffusion transformer (DiT/MMDiT: `transformer_blocks`), else the network whole
        for m in module.modules():
            if isinstance(getattr(m, "transformer_blocks", None), nn.ModuleList) and m is not module:
                return [*m.transformer_blocks, m, module]
        return [module]
    blocks = [*unet.down_blocks, *([unet.mid_block] if getattr(unet, "mid_block", None) is not None else []),
              *unet.up_blocks]
    return [*[b for b in blocks if any(True for _ in b.parameters())], unet, module]


def _fully_shard_state(state, options: FSDPOptions) -> None:
    """FSDP2: shard fake score, generator and EMA per UNet block; rebuild the optimizers on the shards.

    Root cause of the first attempt's failure (``fully_shard`` on the three roots, 2 gloo ranks:
    "element 0 of tensors does not require grad" at the second fake-score step): ``frozen()`` left
    the sharded fake-score parameters frozen for good; see ``core/grads.py`` and
    docs/distributed.md ("FSDP2"). Fixed there, not worked around here.

    The EMA is sharded with G's layout, so ``update_ema`` is a shard-local lerp (no communication),
    and its full weights are gathered only when it is saved (``gathered_module``). The optimizers
    must be fresh (no state yet): load checkpoints after sharding.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from ..core.master_weights import MasterWeightAdam

    device = state.device
    if options.cpu_offload and device.type != "cuda":
        raise ValueError(f"FSDPOptions.cpu_offload moves shards from the GPU to the host; the state is on {device}")
    for name in ("opt_fake", "opt_gen"):
        if getattr(state, name).state:
            # Carrying Adam state over was tried: right for a state trained in this process, wrong
            # (moments on the wrong shards, cause not found) for one restored from a whole-state
            # checkpoint. Refused rather than half right: shard first, then load.
            raise ValueError(f"state.{name} already holds optimizer state (a trained or restored state); "
                             "distribute_state(state, 'fsdp') needs a fresh state: shard it first, then load "
                             "a sharded checkpoint (sharded_checkpoint.load_sharded_checkpoint; a one-process "
                             "state is converted with save_sharded_checkpoint)")
        if isinstance(getattr(state, name), MasterWeightAdam):
            raise ValueError(f"state.{name} keeps fp32 master copies of bf16 weights (trained_precision='bf16'); "
                             "under FSDP2 use FSDPOptions(param_dtype='bf16') instead: fp32 shards are the "
                             "masters and compute runs in bf16")
    bf16 = torch.bfloat16
    # Blocks compute in param_dtype; the UNet unit returns fp32 so that the preconditioning
    # (c_skip x + c_out F) and the losses stay fp32, as without FSDP.
    block_mp = MixedPrecisionPolicy(param_dtype=bf16 if options.param_dtype == "bf16" else None,
                                    reduce_dtype=torch.float32)
    unet_mp = MixedPrecisionPolicy(param_dtype=block_mp.param_dtype, reduce_dtype=torch.float32,
                                   output_dtype=torch.float32 if options.param_dtype == "bf16" else None)
    # The root (the denoiser: preconditioning c_skip x + c_out F) must see its inputs in fp32: no cast
    # there. A network sharded whole keeps its inputs too (the denoisers cast c_in x to the UNet's dtype).
    root_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    whole_mp = MixedPrecisionPolicy(param_dtype=unet_mp.param_dtype, reduce_dtype=torch.float32,
                                    output_dtype=unet_mp.output_dtype, cast_forward_inputs=False)
    common = {"reshard_after_forward": options.reshard_after_forward}
    if options.cpu_offload:
        common["offload_policy"] = CPUOffloadPolicy()

    if options.activation_checkpointing:
        for net in (state.fake, state.generator, state.teacher):
            unet = _diffusers_unet(net)
            if unet is None or not hasattr(unet, "enable_gradient_checkpointing"):
                raise ValueError(f"activation_checkpointing needs a diffusers UNet inside {type(net).__name__}")
            unet.enable_gradient_checkpointing()

    def shard(module: nn.Module) -> None:
        units = _shard_units(module) if options.per_block else [module]
        network = units[-2] if len(units) > 1 else None  # the unit whose output goes back to fp32
        for unit in units:
            mp = (whole_mp if network is None else root_mp if unit is module else
                  unet_mp if unit is network else block_mp)
            fully_shard(unit, mp_policy=mp, **common)

    # A plain skeleton of G on the meta device: what the gathered EMA is loaded into for saving.
    state.__dict__[_TEMPLATES] = {"generator_ema": copy.deepcopy(state.generator_ema).to("meta")}
    for module in (state.fake, state.generator, state.generator_ema):
        shard(module)
    if options.teacher == "shard":
        shard(state.teacher)
    elif options.teacher_dtype == "bf16":
        unet = _diffusers_unet(state.teacher)
        (unet if unet is not None else state.teacher).to(bf16)
    for name, module in (("opt_fake", state.fake), ("opt_gen", state.generator)):
        old = getattr(state, name)
        setattr(state, name, type(old)(module.parameters(), **old.defaults))


_TEMPLATES = "_fsdp_templates"  # attribute on the state: plain meta-device skeletons of sharded networks


def is_sharded(module: nn.Module) -> bool:
    """True for a network whose parameters are FSDP2 shards (DTensors)."""
    return any(getattr(p, "placements", None) is not None for p in module.parameters())


def gathered_module(state, name: str) -> nn.Module | None:
    """``state.<name>`` as a plain module with full weights, for saving (a collective under FSDP2).

    Not sharded: the module itself (unwrapped from DDP), on every rank. Sharded: rank 0 gets a
    plain CPU copy built from the meta skeleton kept at sharding time; other ranks get None.
    """
    module = unwrap(getattr(state, name))
    if not is_sharded(module):
        return module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    templates = state.__dict__.get(_TEMPLATES, {})
    if name not in templates:
        raise ValueError(f"no plain skeleton of state.{name} was kept when it was sharded; "
                         f"kept: {sorted(templates)}")
    plain = copy.deepcopy(templates[name]).to_empty(device="cpu")
    plain.load_state_dict(full)
    return plain
