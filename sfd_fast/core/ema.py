"""Exponential moving average of the generator: EDM/SiD's half-life-in-images schedule, or a fixed decay."""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(halflife_kimg: float, rampup_ratio: float | None, images_seen: int, batch_images: int,
             decay: float | None = None) -> float:
    """Per-step decay so that the EMA's half-life is ``halflife_kimg`` thousand images.

    With ramp-up, the half-life is at most ``rampup_ratio * images_seen`` (early steps forget
    the initialisation fast); this is the SiD EDM code's schedule (500 kimg, ramp-up 0.05).
    ``decay``, when given, is returned as it is: the SFD DDPM code's fixed per-step decay (0.9999).
    """
    if decay is not None:
        return decay
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, images_seen * rampup_ratio)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float, params: list[torch.Tensor] | None = None) -> None:
    """ema <- beta * ema + (1 - beta) * model, for parameters; buffers are copied.

    ``params``: the model's parameter values to average, when they are kept elsewhere at higher
    precision than the module's own (``master_weights.full_precision_params``).
    """
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in (model.parameters() if params is None else params)]
    torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
