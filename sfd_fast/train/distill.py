"""The SFD distillation loop: ``train_step`` repeated, with progress and occasional logging."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.config import SFDConfig
from ..core.faults import check_health
from ..core.state import SFDState
from ..core.step import train_step


def distill(teacher: nn.Module, config: SFDConfig, steps: int, *, device: str | torch.device = "cpu",
            backend: str | None = None, log_every: int = 25, progress: bool = True,
            on_log: Callable[[int, dict[str, float]], None] | None = None) -> SFDState:
    """Run ``steps`` SFD iterations from a teacher and return the final state.

    Metrics are pulled to the host only every ``log_every`` steps (each pull is a sync).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    state = SFDState.create(config, teacher, device)
    start = time.perf_counter()
    with tqdm(range(steps), desc="sfd", disable=not progress) as bar:
        for i in bar:
            metrics = train_step(state, backend)
            if (i + 1) % log_every == 0 or i + 1 == steps:
                host = {k: float(v) for k, v in metrics.items()}
                host["seconds"] = time.perf_counter() - start
                bar.set_postfix(fake=f"{host['loss_fake']:.3f}", gen=f"{host['loss_gen']:.3f}")
                if on_log is not None:
                    on_log(state.step, host)
                check_health(state)  # a run of skipped updates or non-finite weights stops here
    return state
