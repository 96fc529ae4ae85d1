"""Low-precision trained weights with fp32 master copies (the mixed-precision recipe for SD-size nets).

The module keeps its parameters in bf16: forward and backward run in bf16 with no per-step weight
cast (autocast re-casts every fp32 weight on every forward), and gradients are bf16. Adam keeps an
fp32 *master* copy of each weight and updates that: at SD learning rates (1e-6) an update is far
below bf16's resolution (~0.4% of the weight), so stepping the bf16 weights directly would lose
most updates. After each step the master is rounded back into the module's weights.

Per trained parameter: 2 (bf16 weight) + 4 (master) + 8 (Adam moments) bytes persistent, versus
4 + 8 for fp32 weights; gradients are 2 bytes instead of 4 (their fp32 copy lives only inside ``step``). So this option is about
speed and the standard recipe more than memory; the memory saver for SD-size models is the frozen
teacher in bf16 (``T2IOptions.teacher_precision``), which needs no master copy at all.
"""

from __future__ import annotations

import torch
from torch import nn


class MasterWeightAdam(torch.optim.Adam):
    """Adam over fp32 master copies of a module's low-precision parameters.

    ``zero_grad``/``step`` work on the module's parameters as usual (their ``.grad`` is what the
    step checks and sanitises); ``param_groups`` and ``state`` hold the masters. ``state_dict``
    carries the masters (key ``"master"``) so that a resumed run continues bit-exactly.
    """

    def __init__(self, params, **adam_kwargs):
        self.model_params = [p for p in params]
        masters = [p.detach().float().clone().requires_grad_(p.requires_grad) for p in self.model_params]
        super().__init__(masters, **adam_kwargs)
        self.master_params = masters

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdam does not take a closure")
        for p, m in zip(self.model_params, self.master_params):
            m.grad = None if p.grad is None else p.grad.float()
        super().step()
        for m in self.master_params:  # the fp32 gradient copies: 4 B/param freed now, not at the next zero_grad
            m.grad = None
        self.copy_masters_to_model()

    @torch.no_grad()
    def copy_masters_to_model(self) -> None:
        """Round the masters into the module's weights (also after faults' masked-step restore)."""
        torch._foreach_copy_(self.model_params, self.master_params)  # one multi-tensor launch on CUDA

    def state_dict(self) -> dict:
        sd = super().state_dict()
        # Copy each entry: the packed entries are the live state dicts of the masters.
        sd["state"] = {i: {**sd["state"].get(i, {}), "master": m} for i, m in enumerate(self.master_params)}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        entries = {int(i): dict(e) for i, e in state_dict["state"].items()}
        saved = {i: e.pop("master") for i, e in entries.items() if "master" in e}
        super().load_state_dict({**state_dict, "state": {i: e for i, e in entries.items() if e}})
        with torch.no_grad():
            for i, (p, m) in enumerate(zip(self.model_params, self.master_params)):
                # No saved master (a plain-Adam checkpoint): start from the module's loaded weights.
                m.copy_(saved[i] if i in saved else p)
        self.copy_masters_to_model()


def use_master_weights(module: nn.Module, optimizer: torch.optim.Adam,
                       dtype: torch.dtype = torch.bfloat16) -> MasterWeightAdam:
    """Store ``module``'s parameters (not its buffers) in ``dtype``; return Adam on fp32 masters.

    ``optimizer`` is the module's plain Adam, not stepped yet; its hyperparameters are kept.
    The masters start as the current fp32 weights (exact), then the module's copy is rounded.
    """
    if type(optimizer) is not torch.optim.Adam or optimizer.state:
        raise ValueError(f"use_master_weights replaces a fresh torch.optim.Adam, got {type(optimizer).__name__} "
                         f"with {len(optimizer.state)} stepped parameters")
    params = list(module.parameters())
    if {id(p) for g in optimizer.param_groups for p in g["params"]} != {id(p) for p in params}:
        raise ValueError("the optimizer must hold exactly the module's parameters")
    group = optimizer.param_groups[0]
    master_opt = MasterWeightAdam(params, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                  weight_decay=group["weight_decay"], fused=group["fused"])
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype)  # keeps the Parameter objects (hooks, optimizer references)
    return master_opt


def full_precision_params(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """``module``'s parameter values at full precision: the optimizer's masters when it keeps them.

    The generator's EMA averages these (an EMA of rounded bf16 weights would miss the small updates).
    """
    masters = getattr(optimizer, "master_params", None)
    return list(masters) if masters is not None else [p.detach() for p in module.parameters()]


__all__ = ["MasterWeightAdam", "use_master_weights", "full_precision_params"]
