"""SFDState: everything one SFD run owns (three networks, two optimizers, EMA, RNG, counters)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..models.networks import OneStepGenerator
from .config import SFDConfig
from .forget import ForgetSpec


@dataclass
class SFDState:
    """Mutable training state; ``train_step(state)`` advances it by one SFD iteration.

    teacher (f_phi): frozen. fake (f_psi) and generator (G_theta) start as copies of it.
    ``forget`` is a ForgetSpec (class labels) or any object with ``sample_conditions``.
    """

    config: SFDConfig
    forget: ForgetSpec
    teacher: nn.Module
    fake: nn.Module
    generator: OneStepGenerator
    generator_ema: OneStepGenerator
    opt_fake: torch.optim.Optimizer
    opt_gen: torch.optim.Optimizer
    rng: torch.Generator
    step: int = 0
    images_seen: int = 0

    @classmethod
    def create(cls, config: SFDConfig, teacher: nn.Module, device: torch.device | str | None = None,
               conditions=None, fused_adam: bool | None = None) -> "SFDState":
        """Copy the teacher into fake score and generator and build their optimizers.

        ``conditions``: any object with ``sample_conditions`` (e.g. text prompts); default: the
        ForgetSpec of ``config.forget_classes`` over ``teacher.num_classes``.
        ``fused_adam``: one fused kernel per update with its step counters on the device (None:
        on CUDA). The non-finite guard then skips an update through Adam's own ``found_inf``
        input, with no host sync and no snapshot; the CPU default stays torch's plain Adam.
        """
        device = torch.device(device) if device is not None else next(teacher.parameters()).device
        forget = conditions if conditions is not None else ForgetSpec.from_config(config, teacher.num_classes)
        teacher = teacher.to(device).eval().requires_grad_(False)
        fake = copy.deepcopy(teacher).train().requires_grad_(True)
        generator = OneStepGenerator(copy.deepcopy(teacher), config.sigma_init).train().requires_grad_(True)
        generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)

        fused = device.type == "cuda" if fused_adam is None else fused_adam

        def adam(params, lr):
            return torch.optim.Adam(params, lr=lr, betas=config.adam_betas, eps=config.adam_eps,
                                    fused=fused or None)

        rng = torch.Generator(device=device)
        rng.manual_seed(config.seed)
        return cls(config, forget, teacher, fake, generator, generator_ema,
                   adam(fake.parameters(), config.lr_fake), adam(generator.parameters(), config.lr_gen), rng)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.teacher.image_shape
