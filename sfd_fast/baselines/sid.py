"""Plain SiD distillation (no forgetting): the quality reference of the comparison (SPEC section 5).

It is SFD's own ``train_step`` with one change of conditions: every sample of the batch draws a
class uniformly from *all* classes (the forget classes are treated as remaining) and the teacher
sees the same label as G. SFD stacks ``batch_size`` "remain" then ``forget_batch_size`` "forget"
samples with weights scale/n_r and scale*lambda/n_f; setting lambda_g = lambda_sg = n_f/n_r
gives every sample the same weight scale/n_r, so the batch is one plain SiD batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import SFDConfig
from ..core.forget import Conditions
from ..core.state import SFDState


@dataclass(frozen=True)
class AllClasses:
    """Conditions without forgetting: uniform labels over all classes, teacher label = G label."""

    num_classes: int

    def sample_conditions(self, n_remain: int, n_forget: int, generator: torch.Generator | None,
                          device: torch.device | str) -> Conditions:
        c = torch.randint(self.num_classes, (n_remain + n_forget,), generator=generator, device=device)
        return Conditions(generator=c, teacher=c, fake_train=c)


def plain_sid_config(config: SFDConfig) -> SFDConfig:
    """``config`` with the SFD lambdas set so that all samples weigh the same (see module doc)."""
    lam = config.forget_batch_size / config.batch_size
    return config.replace(lambda_g=lam, lambda_sg=lam)


def plain_sid_state(config: SFDConfig, teacher: nn.Module, device: torch.device | str | None = None) -> SFDState:
    """An SFDState that ``train_step`` advances as plain SiD over all classes."""
    state = SFDState.create(plain_sid_config(config), teacher, device)
    state.forget = AllClasses(teacher.num_classes)
    return state


__all__ = ["AllClasses", "plain_sid_config", "plain_sid_state"]
