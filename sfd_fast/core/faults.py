"""Non-finite loss/gradient handling: skip (and count) the update, or raise; stop runaway runs.

``train_step`` calls ``check_finite`` after ``backward()`` (before grads are sanitised) and
``guarded_step`` in place of ``optimizer.step()``. Under the "skip" policy nothing syncs with
the host: the finite flag stays on the device and the update is made a no-op by

- fused Adam/AdamW: the optimizer's own ``found_inf`` input (the mechanism ``GradScaler``
  uses; the kernel leaves params, moments and step count untouched), no copies;
- any other optimizer: a snapshot of params and optimizer state, restored with ``torch.where``
  (one extra copy of params + state per step; use ``fused=True`` Adam for large models, as
  ``SFDState.create`` does on CUDA). An optimizer that keeps host-side step counters (plain
  Adam on CUDA) is switched to ``capturable`` first: restoring a CPU counter from a device flag
  would be a device-to-host sync per parameter.

The "raise" policy reads the flag on the host: one sync per optimizer step, by request.
Runs that keep failing are stopped by ``check_health`` (a host read the caller makes when it
syncs anyway: at log and checkpoint time), from a device-side "worst streak" counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from . import ranks

POLICIES = ("skip", "raise")
OPTIMIZER_NAMES = ("fake", "gen")


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN/inf and the policy says raise, or too many steps in a row were."""


@dataclass
class FaultMonitor:
    """Device-side counters: skipped updates per optimizer, current and worst non-finite streak."""

    skipped: dict[str, torch.Tensor] = field(default_factory=dict)
    streak: dict[str, torch.Tensor] = field(default_factory=dict)
    worst_streak: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def create(cls, device: torch.device) -> "FaultMonitor":
        def zeros():
            return {n: torch.zeros((), dtype=torch.int64, device=device) for n in OPTIMIZER_NAMES}
        return cls(zeros(), zeros(), zeros())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> 0-d tensor view, for checkpoints."""
        return {f"{kind}/{n}": getattr(self, kind)[n] for kind in ("skipped", "streak", "worst_streak")
                for n in OPTIMIZER_NAMES}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            kind, name = key.split("/")
            getattr(self, kind)[name].copy_(value)


def monitor(state) -> FaultMonitor:
    """The state's FaultMonitor, created on first use (kept beside the SFDState's fields)."""
    found = state.__dict__.get("faults")
    if found is None:
        found = state.__dict__["faults"] = FaultMonitor.create(state.device)
    return found


def check_finite(loss: torch.Tensor, params: Iterable[torch.Tensor],
                 every_sample_masked: torch.Tensor | None = None) -> torch.Tensor:
    """0-d bool tensor: the loss and every gradient of ``params`` are finite, on every rank.

    ``every_sample_masked`` (0-d bool, ``all_masked(per_sample)``): a batch whose every sample
    was masked counts as non-finite too. Its update would be Adam momentum alone, and a run
    with a NaN teacher would go on silently instead of being skipped, counted and stopped.
    No host sync. In a distributed run this is a collective (all ranks call it together).
    """
    grads = [p.grad for p in params if p.grad is not None]
    found_inf = (~torch.isfinite(loss.detach())).float().reshape(())
    if every_sample_masked is not None:
        found_inf = found_inf + every_sample_masked.float()
    if grads:
        # GradScaler's fused check (one pass over all grads); scale 1 leaves them unchanged.
        grad_inf = torch.zeros((), device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, grad_inf, torch.ones((), device=grads[0].device))
        found_inf = found_inf.to(grad_inf.device) + grad_inf
    if ranks.is_initialized():
        # Grads are already all-reduced by DDP, but the loss is per rank: agree, so that every
        # rank skips the same updates (a device-side collective, no host sync).
        device = found_inf.device
        found_inf = found_inf.to(ranks.comm_device())
        torch.distributed.all_reduce(found_inf)
        found_inf = found_inf.to(device)
    return found_inf == 0


def all_masked(per_sample: torch.Tensor) -> torch.Tensor:
    """0-d bool: no sample of the batch has a finite loss."""
    return (~torch.isfinite(per_sample.detach())).all()


def guarded_step(state, name: str, optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> dict[str, torch.Tensor]:
    """``optimizer.step()`` if ``finite`` else a no-op, per ``state.config.nonfinite_policy``.

    Returns metrics (0-d tensors): ``skipped_<name>`` (total so far) and ``nonfinite_streak``.
    Policy "sanitize" is the reference code's behaviour: the gradients were already passed
    through nan_to_num, so the update is applied anyway; the counters then count the
    non-finite updates that were applied rather than skipped.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer name {name!r}; allowed: {OPTIMIZER_NAMES}")
    policy = getattr(state.config, "nonfinite_policy", "skip")
    mon = monitor(state)
    if policy == "raise" and not bool(finite):  # the requested sync
        raise NonFiniteError(f"non-finite {name} loss or gradient at step {state.step} "
                             "(nonfinite_policy='raise'; use 'skip' to skip and count such steps)")
    if policy == "sanitize":
        optimizer.step()
    elif getattr(optimizer, "defaults", {}).get("fused"):
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    else:
        _masked_step(optimizer, finite)
    bad = (~finite).long()
    mon.skipped[name].add_(bad)
    mon.streak[name].add_(1).mul_(bad)  # +1 on a skipped update, back to 0 on a good one
    torch.maximum(mon.worst_streak[name], mon.streak[name], out=mon.worst_streak[name])
    return {f"skipped_{name}": mon.skipped[name].clone(), f"nonfinite_streak_{name}": mon.streak[name].clone()}


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam-style ``capturable=True``: step counters on ``device`` (no host read in the update).

    Needed for CUDA-graph capture, and by ``_masked_step`` so that restoring a skipped update
    stays on the device.
    """
    for group in optimizer.param_groups:
        group["capturable"] = True
    for st in optimizer.state.values():
        if "step" in st:
            st["step"] = st["step"].to(device=device, dtype=torch.float32)


def _has_host_counters(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """True for an optimizer with a ``capturable`` switch that is off while its params are on ``device``."""
    return device.type != "cpu" and any("capturable" in g and not g["capturable"] for g in optimizer.param_groups)


def _masked_step(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """Step any optimizer, then put params and state back where ``finite`` is False."""
    if _has_host_counters(optimizer, finite.device):
        make_capturable(optimizer, finite.device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    old_params = [p.detach().clone() for p in params]
    old_state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                 for p in params if p in optimizer.state}
    optimizer.step()
    with torch.no_grad():
        for p, old in zip(params, old_params):
            p.copy_(torch.where(finite, p, old))
        for p in params:
            before = old_state.get(id(p), {})
            for k, v in optimizer.state[p].items():
                if torch.is_tensor(v):
                    # Lazily created state was zero before the first step (Adam's init).
                    old = before.get(k, torch.zeros_like(v))
                    v.copy_(torch.where(finite.to(v.device), v, old))
    # Optimizers over fp32 master copies (master_weights.MasterWeightAdam) hold the masters in
    # param_groups: re-round the restored masters into the module's low-precision weights.
    sync = getattr(optimizer, "copy_masters_to_model", None)
    if sync is not None:
        sync()


def nonfinite_modules(state, names=("generator", "fake", "generator_ema")) -> list[str]:
    """Names of the state's trained networks that hold a NaN/inf weight (one host read).

    The guard checks losses and gradients; an update of finite gradients can still overflow a
    weight (a huge lr), so weights are checked too before anything is saved or trusted.
    """
    finite, sharded = [], False
    for name in names:  # one foreach max-norm per network, all read back in one transfer
        params = []
        for p in getattr(state, name).parameters():
            if p.is_floating_point():
                sharded = sharded or hasattr(p, "to_local")
                # FSDP2 shards: this rank's part (it may be empty: a tensor with fewer rows than ranks).
                local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
                if local.numel():
                    params.append(local)
        norms = torch._foreach_norm(params, float("inf")) if params else [torch.zeros((), device=state.device)]
        finite.append(torch.isfinite(torch.stack([n.to(state.device) for n in norms])).all())
    flags = torch.stack(finite)
    if sharded and ranks.is_initialized():
        # Each rank saw its shards only: agree (MIN), so every rank decides the same (a collective:
        # sharded states call this on every rank, as check_health and the checkpoint writers do).
        agreed = flags.to(device=ranks.comm_device(), dtype=torch.int32)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        flags = agreed.bool()
    return [name for name, ok in zip(names, flags.tolist()) if not ok]


def check_health(state, max_consecutive: int | None = None) -> None:
    """Raise NonFiniteError if a trained network's weights are non-finite, or if some optimizer
    skipped ``max_consecutive`` steps in a row.

    A few host reads; call it where the loop syncs anyway (logging, checkpointing).
    """
    bad = nonfinite_modules(state)
    if bad:
        raise NonFiniteError(f"the {', '.join(bad)} weights became non-finite by step {state.step} (a NaN/inf "
                             "teacher, or an update that overflowed: check the teacher, lower the learning rate); "
                             "nothing non-finite is saved")
    limit = max_consecutive if max_consecutive is not None else getattr(
        state.config, "max_consecutive_nonfinite", None)
    if not limit:
        return
    mon = monitor(state)
    worst = {n: int(t) for n, t in mon.worst_streak.items()}
    for name, streak in worst.items():
        if streak >= limit:
            raise NonFiniteError(
                f"{streak} consecutive {name} updates had a non-finite loss or gradient (limit "
                f"max_consecutive_nonfinite={limit}); stopping at step {state.step}. Lower the learning rate, "
                f"check the teacher for NaN outputs, or resume from an earlier checkpoint. Skipped so far: "
                f"{ {n: int(t) for n, t in mon.skipped.items()} }")
