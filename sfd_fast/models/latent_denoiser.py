"""A latent SD UNet (epsilon or v prediction) as an x0 denoiser D(x, sigma, text) with CFG inside.

Same interface as ``networks.DDPMDenoiser`` (SPEC section 3): with abar = 1 / (1 + sigma^2),
the UNet sees sqrt(abar) x at the fractional DDPM timestep of sigma, and
  epsilon: D = x - sigma * eps_hat;  v: D = sqrt(abar) x_ddpm - sqrt(1 - abar) v_hat.
The condition c is a text-embedding tensor (B, L, D). With ``guidance_scale`` s != 1 the network
output is uncond + s * (cond - uncond), where uncond is conditioned on ``negative_embedding``
(the "" prompt, or a negative prompt such as an NSFW keyword list); cond and uncond run as one
batched UNet call. CFG is linear, so guiding eps/v equals guiding D.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .ddpm_schedule import log_sigma_table, sigma_of_timestep, timestep_of_sigma
from .networks import batch_sigma
from .unet import unet_image_shape


FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)  # velocity (rectified-flow) training schedules


def is_flow_schedule(scheduler_config: dict) -> bool:
    """Whether a scheduler config is a flow-matching one: by ``_class_name`` when the config has it (JSON
    files do), else by its keys (an in-memory ``dict(scheduler.config)``: ``shift`` and no beta table)."""
    name = scheduler_config.get("_class_name")
    if name is not None:
        return name in FLOW_SCHEDULERS
    betas = ("beta_start", "trained_betas")
    return "shift" in scheduler_config and not any(k in scheduler_config for k in betas)


def require_ddpm_schedule(scheduler_config: dict, where: str = "LatentDenoiser") -> None:
    """ValueError unless ``scheduler_config`` is a DDPM-family (beta table) schedule.

    ``DDPMScheduler.from_config`` silently accepts a flow-matching config (it ignores ``shift`` and
    falls back to default betas), which would give a wrong teacher with no error.
    """
    if is_flow_schedule(scheduler_config):
        name = scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        raise ValueError(f"{where} is a DDPM (epsilon / v prediction) adapter, but the scheduler is {name}, a "
                         "flow-matching (velocity) model; use sfd_fast.models.flow_denoiser.FlowDenoiser "
                         "(SD3-style pipelines). DDPM-family schedulers (DDPM, DDIM, Euler, PNDM, DPM-Solver, ...) "
                         "go with LatentDenoiser")


class GuidedTextDenoiser(nn.Module):
    """What every text-conditioned latent denoiser shares: CFG with a negative prompt, autocast, shapes.

    Subclasses set ``self.network`` (the diffusers model) and implement ``network_call(x_in, t, c)``
    (the raw model output for model-space input x_in at model timesteps t) and ``forward``. Those whose
    condition packs a second part behind the tokens set ``self.layout`` (a ``PackedText``); the others
    override ``text_shape``.
    """

    def _init_guidance(self, guidance_scale: float, negative_embedding: torch.Tensor | None,
                       compute_dtype: torch.dtype | None) -> None:
        self.register_buffer("negative_embedding", None if negative_embedding is None
                             else negative_embedding.detach().float().reshape(1, *negative_embedding.shape[-2:]),
                             persistent=False)
        self.guidance_scale = float(guidance_scale)
        self.compute_dtype = compute_dtype  # e.g. torch.bfloat16: autocast the network, weights stay as they are
        self._check_guidance()

    def _check_guidance(self) -> None:
        if self.guidance_scale != 1.0 and self.negative_embedding is None:
            raise ValueError(f"guidance_scale={self.guidance_scale} needs a negative_embedding (1, L, D): "
                             "the embedding of '' or of the negative prompt")

    def set_guidance(self, scale: float, negative_embedding: torch.Tensor | None = None) -> "GuidedTextDenoiser":
        """Change the CFG scale (and optionally the negative prompt's embedding (1, L, D))."""
        self.guidance_scale = float(scale)
        if negative_embedding is not None:
            device = next(self.network.parameters()).device
            self.negative_embedding = negative_embedding.detach().float().reshape(
                1, *negative_embedding.shape[-2:]).to(device)
        self._check_guidance()
        return self

    def network_call(self, x_in: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def guided_output(self, x_in: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The network's (CFG-combined) output, float32, for model-space input x_in (B, C, h, w) at timesteps t (B,)."""
        dtype = self.network.dtype
        autocast = (torch.autocast(x_in.device.type, dtype=self.compute_dtype) if self.compute_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            if self.guidance_scale == 1.0:
                return self.network_call(x_in.to(dtype), t, c.to(dtype)).float()
            negative = self.negative_embedding.to(dtype).expand(c.shape[0], -1, -1)
            both = self.network_call(torch.cat([x_in, x_in]).to(dtype), torch.cat([t, t]),
                                     torch.cat([negative, c.to(dtype)])).float()
        # Slices, not chunk(2): torch.export cannot prove chunk's size guard for a symbolic batch.
        uncond, cond = both[:x_in.shape[0]], both[x_in.shape[0]:]
        return uncond + self.guidance_scale * (cond - uncond)

    def _check_condition(self, x: torch.Tensor, c: torch.Tensor) -> None:
        if c.dim() != 3 or c.shape[0] != x.shape[0]:
            raise ValueError(f"text condition must be (B, L, D) with B={x.shape[0]}, got {tuple(c.shape)}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents: the network config's in_channels and sample_size (UNets and DiTs alike)."""
        return unet_image_shape(self.network)

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L + k, D) of one packed condition."""
        return self.layout.shape


class LatentDenoiser(GuidedTextDenoiser):
    """D(x, sigma, c): x (B, 4, h, w) latents, sigma (B,) or scalar, c (B, L, D) text embeddings."""

    kind = "latent"
    PREDICTION_TYPES = ("epsilon", "v_prediction")

    def __init__(self, unet: nn.Module, scheduler_config: dict, guidance_scale: float = 1.0,
                 negative_embedding: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self._init_schedule(scheduler_config)
        if not hasattr(unet.config, "cross_attention_dim"):
            raise ValueError(f"{type(unet).__name__} is not text-conditioned (no cross_attention_dim); "
                             "expected a diffusers UNet2DConditionModel")
        self._check_added_conditioning(unet)
        self.unet = unet
        self._init_guidance(guidance_scale, negative_embedding, compute_dtype)

    network_subfolder = "unet"  # where a pipeline folder keeps the network

    @staticmethod
    def _check_added_conditioning(unet: nn.Module) -> None:
        added = getattr(unet.config, "addition_embed_type", None)
        if added is not None:
            raise ValueError(f"this UNet takes added conditions (addition_embed_type={added!r}) that LatentDenoiser "
                             "does not pass; supported: plain SD1.x/2.x UNets here, 'text_time' (SDXL) through "
                             "sfd_fast.models.sdxl.SDXLDenoiser")

    def _init_schedule(self, scheduler_config: dict) -> None:
        """prediction_type, scheduler_config and the log-sigma table of a DDPM-family schedule."""
        from diffusers import DDPMScheduler

        require_ddpm_schedule(scheduler_config, type(self).__name__)
        scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in self.PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported; "
                             f"allowed: {self.PREDICTION_TYPES}")
        self.scheduler_config = dict(scheduler.config)
        self.register_buffer("log_sigmas", log_sigma_table(scheduler.alphas_cumprod), persistent=False)

    def stock_call_kwargs(self) -> dict:
        """Extra keyword arguments the stock pipeline call needs to see what this denoiser sees (none here)."""
        return {}

    @property
    def network(self) -> nn.Module:
        """The diffusers model (here the UNet); the text-to-image memory options act on it."""
        return self.unet

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep (B,) of sigma (B,): the lookup shared with ``DDPMDenoiser``."""
        return timestep_of_sigma(sigma, self.log_sigmas)

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L, D) of the text embeddings this UNet cross-attends to."""
        length = self.negative_embedding.shape[1] if self.negative_embedding is not None else None
        return (length, int(self.unet.config.cross_attention_dim))

    def network_call(self, x_in: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.unet(x_in, t, encoder_hidden_states=c).sample

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self._check_condition(x, c)
        sigma = batch_sigma(sigma, x)
        sqrt_abar = (1 + sigma ** 2).rsqrt()
        x = x.to(sigma.dtype)
        x_in = sqrt_abar * x
        out = self.guided_output(x_in, self.timestep(sigma.flatten()), c).to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        return sqrt_abar * x_in - sigma * sqrt_abar * out


__all__ = ["LatentDenoiser", "GuidedTextDenoiser", "require_ddpm_schedule", "FLOW_SCHEDULERS", "is_flow_schedule",
           "sigma_of_timestep"]  # sigma_of_timestep: from ddpm_schedule
