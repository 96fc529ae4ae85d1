"""SFDState: everything one SFD run owns (three networks, two optimizers, EMA, RNG, counters)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..models.networks import OneStepGenerator
from ..models.unet import set_training_dropout
from .config import SFDConfig
from .forget import ForgetSpec
from .lora import FAKE_ADAPTER, GENERATOR_ADAPTER, LoRAConfig


DROPOUT_SEED_OFFSET = 0x5FD0  # dropout_rng = seed + this: a stream apart from the noise generator's


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
    dropout_rng: torch.Generator | None = None  # dropout masks of fake and G (config.train_dropout), else None
    lora: LoRAConfig | None = None  # LoRA mode (core/lora.py): fake = teacher + LoRA (and G with lora.generator), else None

    @property
    def trains_with_dropout(self) -> bool:
        """config.train_dropout is set: fake and G drop out only while they are the network being trained."""
        return self.config.train_dropout is not None

    @classmethod
    def create(cls, config: SFDConfig, teacher: nn.Module, device: torch.device | str | None = None,
               conditions=None, fused_adam: bool | None = None, lora: LoRAConfig | None = None) -> "SFDState":
        """Copy the teacher into fake score and generator and build their optimizers.

        ``conditions``: any object with ``sample_conditions`` (e.g. text prompts); default: the
        ForgetSpec of ``config.forget_classes`` over ``teacher.num_classes``.
        ``config.train_dropout``: the fake score's and G's residual-block dropout is set to it,
        with masks from ``dropout_rng`` (seeded from ``config.seed``); the teacher stays in eval.
        ``fused_adam``: one fused kernel per update with its step counters on the device (None:
        on CUDA). The non-finite guard then skips an update through Adam's own ``found_inf``
        input, with no host sync and no snapshot; the CPU default stays torch's plain Adam.
        ``lora`` (``sfd_fast.core.lora.LoRAConfig``, needs peft): the fake score is a copy of the
        teacher with a trainable LoRA adapter and ``state.teacher`` is that same network with the
        adapter off (one copy of the base weights; see docs/lora.md). With ``lora.generator`` G is
        teacher + LoRA too, on its own frozen base copy, and ``generator_ema`` is a plain network
        holding the EMA of G's merged weights. The optimizers hold only the trainable parameters.
        """
        device = torch.device(device) if device is not None else next(teacher.parameters()).device
        forget = conditions if conditions is not None else ForgetSpec.from_config(config, teacher.num_classes)
        teacher = teacher.to(device).eval().requires_grad_(False)
        if lora is None:
            fake = copy.deepcopy(teacher).train().requires_grad_(True)
            generator = OneStepGenerator(copy.deepcopy(teacher), config.sigma_init).train().requires_grad_(True)
            generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
        else:
            from .lora import BaseView, attach

            if not isinstance(lora, LoRAConfig):
                raise TypeError(f"lora must be a sfd_fast.core.lora.LoRAConfig or None, got {type(lora).__name__}")
            fake = attach(copy.deepcopy(teacher), lora, FAKE_ADAPTER, config.seed).train()
            if lora.generator:
                generator = OneStepGenerator(attach(copy.deepcopy(teacher), lora, GENERATOR_ADAPTER, config.seed),
                                             config.sigma_init).train()
                generator_ema = OneStepGenerator(copy.deepcopy(teacher), config.sigma_init).eval().requires_grad_(False)
            else:
                generator = OneStepGenerator(copy.deepcopy(teacher), config.sigma_init).train().requires_grad_(True)
                generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
            teacher = BaseView(fake)  # the teacher's weights are the fake score's base: one copy in the state
        dropout_rng = None
        if config.train_dropout is not None:
            # A generator of its own, so that the reference and the fused step (which draw the
            # step's noise from ``rng`` in different interleavings) see the same masks.
            dropout_rng = torch.Generator(device=device)
            dropout_rng.manual_seed(config.seed + DROPOUT_SEED_OFFSET)
            for net in (fake, generator):
                set_training_dropout(net, config.train_dropout, dropout_rng)

        fused = device.type == "cuda" if fused_adam is None else fused_adam

        def adam(params, lr):
            return torch.optim.Adam(params, lr=lr, betas=config.adam_betas, eps=config.adam_eps,
                                    fused=fused or None)

        rng = torch.Generator(device=device)
        rng.manual_seed(config.seed)

        def trained(net):  # LoRA mode: the adapter's matrices only (the base is frozen)
            return [p for p in net.parameters() if p.requires_grad]

        return cls(config, forget, teacher, fake, generator, generator_ema,
                   adam(trained(fake), config.lr_fake), adam(trained(generator), config.lr_gen), rng,
                   dropout_rng=dropout_rng, lora=lora)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.teacher.image_shape
