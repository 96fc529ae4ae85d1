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


class LatentDenoiser(nn.Module):
    """D(x, sigma, c): x (B, 4, h, w) latents, sigma (B,) or scalar, c (B, L, D) text embeddings."""

    kind = "latent"
    PREDICTION_TYPES = ("epsilon", "v_prediction")

    def __init__(self, unet: nn.Module, scheduler_config: dict, guidance_scale: float = 1.0,
                 negative_embedding: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in self.PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported; "
                             f"allowed: {self.PREDICTION_TYPES}")
        if not hasattr(unet.config, "cross_attention_dim"):
            raise ValueError(f"{type(unet).__name__} is not text-conditioned (no cross_attention_dim); "
                             "expected a diffusers UNet2DConditionModel")
        self.unet = unet
        self.scheduler_config = dict(scheduler.config)
        self.register_buffer("log_sigmas", log_sigma_table(scheduler.alphas_cumprod), persistent=False)
        self.register_buffer("negative_embedding", None if negative_embedding is None
                             else negative_embedding.detach().float().reshape(1, *negative_embedding.shape[-2:]),
                             persistent=False)
        self.guidance_scale = float(guidance_scale)
        self.compute_dtype = compute_dtype  # e.g. torch.bfloat16: autocast the UNet, weights stay as they are
        self._check_guidance()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep (B,) of sigma (B,): the lookup shared with ``DDPMDenoiser``."""
        return timestep_of_sigma(sigma, self.log_sigmas)

    def _check_guidance(self) -> None:
        if self.guidance_scale != 1.0 and self.negative_embedding is None:
            raise ValueError(f"guidance_scale={self.guidance_scale} needs a negative_embedding (1, L, D): "
                             "the embedding of '' or of the negative prompt")

    def set_guidance(self, scale: float, negative_embedding: torch.Tensor | None = None) -> "LatentDenoiser":
        """Change the CFG scale (and optionally the negative prompt's embedding (1, L, D))."""
        self.guidance_scale = float(scale)
        if negative_embedding is not None:
            device = self.log_sigmas.device
            self.negative_embedding = negative_embedding.detach().float().reshape(
                1, *negative_embedding.shape[-2:]).to(device)
        self._check_guidance()
        return self

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return unet_image_shape(self.unet)

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L, D) of the text embeddings this UNet cross-attends to."""
        length = self.negative_embedding.shape[1] if self.negative_embedding is not None else None
        return (length, int(self.unet.config.cross_attention_dim))

    def guided_output(self, x_in: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The UNet's (CFG-combined) eps or v for DDPM-scaled input x_in (B, C, h, w) at timesteps t (B,)."""
        dtype = self.unet.dtype
        autocast = (torch.autocast(x_in.device.type, dtype=self.compute_dtype) if self.compute_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            if self.guidance_scale == 1.0:
                return self.unet(x_in.to(dtype), t, encoder_hidden_states=c.to(dtype)).sample.float()
            negative = self.negative_embedding.to(dtype).expand(c.shape[0], -1, -1)
            both = self.unet(torch.cat([x_in, x_in]).to(dtype), torch.cat([t, t]),
                             encoder_hidden_states=torch.cat([negative, c.to(dtype)])).sample.float()
        # Slices, not chunk(2): torch.export cannot prove chunk's size guard for a symbolic batch.
        uncond, cond = both[:x_in.shape[0]], both[x_in.shape[0]:]
        return uncond + self.guidance_scale * (cond - uncond)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.dim() != 3 or c.shape[0] != x.shape[0]:
            raise ValueError(f"text condition must be (B, L, D) with B={x.shape[0]}, got {tuple(c.shape)}")
        sigma = batch_sigma(sigma, x)
        sqrt_abar = (1 + sigma ** 2).rsqrt()
        x = x.to(sigma.dtype)
        x_in = sqrt_abar * x
        out = self.guided_output(x_in, self.timestep(sigma.flatten()), c).to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        return sqrt_abar * x_in - sigma * sqrt_abar * out


__all__ = ["LatentDenoiser", "sigma_of_timestep"]  # sigma_of_timestep: from ddpm_schedule
