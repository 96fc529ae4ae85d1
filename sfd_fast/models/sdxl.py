"""SDXL teachers: a ``StableDiffusionXLPipeline`` folder as SFD's backbone.

SDXL's UNet is a DDPM-family ``UNet2DConditionModel`` (epsilon or v prediction) like SD1.x, so the
denoiser is ``LatentDenoiser``'s arithmetic; what differs is the conditioning, read from diffusers'
own ``StableDiffusionXLPipeline.encode_prompt`` (so the stock pipeline sees the same numbers):
- tokens: the penultimate hidden states of both CLIP text encoders, concatenated (B, 77, 768 + 1280);
- ``added_cond_kwargs["text_embeds"]``: the pooled (projected) embedding of the *second* encoder, packed
  behind the tokens (``PackedText``);
- ``added_cond_kwargs["time_ids"]``: (original size, crop top-left, target size) = (H, W, 0, 0, H, W) for
  the default image size H = W = ``sample_size`` x VAE factor, as the stock call builds them; a buffer.
- The empty prompt is the zero embedding when the folder says ``force_zeros_for_empty_prompt`` (SDXL's
  default): that is how the stock pipeline forms its unconditional CFG branch, and what SDXL was trained
  with for dropped captions; it also serves the fake score's prompt drop.

Folder layout (``StableDiffusionXLPipeline.save_pretrained``): model_index.json, unet/, vae/,
text_encoder/ + tokenizer/ (CLIP-L), text_encoder_2/ + tokenizer_2/ (CLIP-G with projection), scheduler/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .latent_denoiser import GuidedTextDenoiser, LatentDenoiser, require_ddpm_schedule
from .pipeline_base import WrappedDiffusersPipeline, load_frozen_pipeline, read_folder_configs
from .text_condition import PackedText

SDXL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


def require_sdxl_conditioning(config: dict, where: str) -> None:
    if config.get("addition_embed_type") != "text_time" or config.get("cross_attention_dim") is None:
        raise ValueError(f"{where} ({config.get('_class_name')}, addition_embed_type="
                         f"{config.get('addition_embed_type')!r}) lacks the conditioning an SDXL teacher needs; "
                         "supported: UNet2DConditionModel with addition_embed_type 'text_time' (text_embeds + time_ids)")


class SDXLDenoiser(LatentDenoiser):
    """D(x, sigma, c) over an SDXL UNet: c packs the two encoders' tokens and the second's pooled embedding."""

    kind = "sdxl"

    def __init__(self, unet: nn.Module, scheduler_config: dict, layout: PackedText, time_ids: torch.Tensor,
                 guidance_scale: float = 1.0, negative_embedding: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        GuidedTextDenoiser.__init__(self)
        require_sdxl_conditioning(dict(unet.config), type(unet).__name__)
        self._init_schedule(scheduler_config)
        if layout.width != int(unet.config.cross_attention_dim):
            raise ValueError(f"text layout {layout} does not fit the UNet's cross_attention_dim "
                             f"{unet.config.cross_attention_dim}")
        self.unet = unet
        self.layout = layout
        self.register_buffer("time_ids", time_ids.detach().float().reshape(1, -1), persistent=False)
        self._init_guidance(guidance_scale, negative_embedding, compute_dtype)

    def network_call(self, x_in: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        hidden, pooled = self.layout.unpack(c)
        added = {"text_embeds": pooled, "time_ids": self.time_ids.to(x_in.dtype).expand(x_in.shape[0], -1)}
        return self.unet(x_in, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


@dataclass
class SDXLT2IPipeline(WrappedDiffusersPipeline):
    """The parts of a StableDiffusionXLPipeline that SFD uses (``pipe`` is the diffusers pipeline itself)."""

    pipe: object
    path: Path | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    kind = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    network_subfolder = "unet"

    @property
    def unet(self) -> nn.Module:
        return self.pipe.unet

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.pipe.vae_scale_factor

    @property
    def time_ids(self) -> torch.Tensor:
        """(1, 6): original size, crop top-left, target size, as ``_get_add_time_ids`` forms them by default."""
        s = self.image_size
        projection = int(self.pipe.text_encoder_2.config.projection_dim)
        return self.pipe._get_add_time_ids((s, s), (0, 0), (s, s), torch.float32, projection)

    @property
    def layout(self) -> PackedText:
        return PackedText(int(self.pipe.tokenizer.model_max_length), int(self.unet.config.cross_attention_dim),
                          int(self.pipe.text_encoder_2.config.projection_dim))

    def _encode_new(self, prompts: list[str]) -> list[torch.Tensor]:
        """Packed conditions (N, 77 + k, D): both encoders' penultimate tokens, then encoder 2's pooled embedding."""
        zeros = self.pipe.config.force_zeros_for_empty_prompt
        encode = [p for p in prompts if not (zeros and p == "")]
        layout = self.layout
        rows = {}
        if encode:
            device = next(self.pipe.text_encoder_2.parameters()).device
            hidden, _, pooled, _ = self.pipe.encode_prompt(prompt=list(encode), device=device,
                                                           do_classifier_free_guidance=False)
            rows.update(zip(encode, layout.pack(hidden.float(), pooled.float())))
        if zeros and "" in prompts:  # the stock pipeline's unconditional branch (negative_prompt=None)
            rows[""] = torch.zeros(layout.shape, device=self.device)
        return [rows[p] for p in prompts]

    def make_denoiser(self, guidance_scale: float = 1.0, negative_embedding: torch.Tensor | None = None,
                      network: nn.Module | None = None) -> SDXLDenoiser:
        return SDXLDenoiser(network if network is not None else self.unet, self.scheduler_config, self.layout,
                            self.time_ids, guidance_scale, negative_embedding)


def load_sdxl_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> SDXLT2IPipeline:
    """Read a local StableDiffusionXLPipeline folder; frozen VAE and both text encoders in eval mode."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    unet_config, scheduler_config = read_folder_configs(
        path, SDXL_PARTS, "SDXL pipeline", ("unet/config.json", "scheduler/scheduler_config.json"))
    require_sdxl_conditioning(unet_config, f"the UNet in {str(path / 'unet')!r}")
    require_ddpm_schedule(scheduler_config, "a StableDiffusionXLPipeline teacher (SDXLDenoiser)")
    pipe = load_frozen_pipeline(StableDiffusionXLPipeline, path, "SDXL pipeline", device, dtype,
                                SDXLT2IPipeline.network_subfolder, ("vae", "text_encoder", "text_encoder_2"),
                                add_watermarker=False)
    return SDXLT2IPipeline(pipe, path)


__all__ = ["SDXLDenoiser", "SDXLT2IPipeline", "load_sdxl_pipeline", "require_sdxl_conditioning", "SDXL_PARTS"]
