"""An SD3-style flow-matching pipeline folder as SFD's text-to-image backbone.

The folder is the ``StableDiffusion3Pipeline.save_pretrained`` layout (model_index.json,
transformer/, vae/, text_encoder/ + tokenizer/ (CLIP-L), text_encoder_2/ + tokenizer_2/ (CLIP-G),
text_encoder_3/ + tokenizer_3/ (T5), scheduler/ = FlowMatchEulerDiscreteScheduler), read with
diffusers' own ``from_pretrained`` from local files (safetensors only). Prompts are encoded by the
pipeline's own ``encode_prompt`` (so the stock pipeline sees the same embeddings), once per
distinct prompt, and packed with their pooled embedding into one tensor (``PackedText``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .pipeline_base import WrappedDiffusersPipeline, load_frozen_pipeline, read_folder_configs
from .text_condition import PackedText

SD3_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length; capped by the T5 tokenizer's own


def t5_sequence_length(tokenizer_max_length: int | None) -> int:
    """The ``max_sequence_length`` prompts are encoded with: the default, capped by the T5 tokenizer's length
    (None: the folder has no T5)."""
    if tokenizer_max_length is None:
        return MAX_SEQUENCE_LENGTH
    return min(MAX_SEQUENCE_LENGTH, int(tokenizer_max_length))


@dataclass
class SD3T2IPipeline(WrappedDiffusersPipeline):
    """The parts of a StableDiffusion3Pipeline that SFD uses (``pipe`` is the diffusers pipeline itself)."""

    pipe: object
    max_sequence_length: int
    path: Path | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    kind = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    network_subfolder = "transformer"

    @property
    def layout(self) -> PackedText:
        hidden, pooled = self._encode([""])
        return PackedText(hidden.shape[1], hidden.shape[2], pooled.shape[1])

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.pipe.text_encoder
        device = next(encoder.parameters()).device
        hidden, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return hidden.float(), pooled.float()

    def _encode_new(self, prompts: list[str]) -> torch.Tensor:
        """Packed conditions (N, L + k, D): SD3's joint-attention tokens (CLIP-L|G padded, then T5) and pooled."""
        hidden, pooled = self._encode(prompts)
        layout = PackedText(hidden.shape[1], hidden.shape[2], pooled.shape[1])
        return layout.pack(hidden, pooled)

    def make_denoiser(self, guidance_scale: float = 1.0, negative_embedding: torch.Tensor | None = None,
                      network: nn.Module | None = None):
        from .flow_denoiser import FlowDenoiser

        return FlowDenoiser(network if network is not None else self.network, self.scheduler_config, self.layout,
                            guidance_scale, negative_embedding)

    def make_generator(self, denoiser, sigma_init: float):
        from .flow_denoiser import FlowOneStepGenerator

        return FlowOneStepGenerator(denoiser, sigma_init)

    def call_kwargs(self) -> dict:
        """Arguments of the stock pipeline call that our encoding assumes."""
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from model-space latents (as the SD3 pipeline un-normalises them:
        SD3's VAE has a ``shift_factor``, which the SD/SDXL/PixArt pipelines do not apply)."""
        cfg = self.vae.config
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.decode(z.to(vae_dtype)).sample.float().clamp(-1, 1)


def load_sd3_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> SD3T2IPipeline:
    """Read a local StableDiffusion3Pipeline folder; frozen VAE and text encoders in eval mode."""
    from diffusers import StableDiffusion3Pipeline

    from .flow_denoiser import require_sd3_conditioning

    path = Path(path)
    (transformer_config,) = read_folder_configs(path, SD3_PARTS, "SD3 pipeline", ("transformer/config.json",),
                                                " (text_encoder_3/ + tokenizer_3/ optional)")
    require_sd3_conditioning(transformer_config, f"the transformer in {str(path / 'transformer')!r} "
                                                 f"({transformer_config.get('_class_name')})")  # before any weight loads
    pipe = load_frozen_pipeline(StableDiffusion3Pipeline, path, "SD3 pipeline", device, dtype,
                                SD3T2IPipeline.network_subfolder,
                                ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"))
    t5 = getattr(pipe, "tokenizer_3", None)
    return SD3T2IPipeline(pipe, t5_sequence_length(t5.model_max_length if t5 is not None else None), path)


__all__ = ["SD3T2IPipeline", "load_sd3_pipeline", "t5_sequence_length", "SD3_PARTS", "MAX_SEQUENCE_LENGTH"]
