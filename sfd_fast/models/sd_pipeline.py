"""Load a Stable-Diffusion-style pipeline folder; encode prompts once; decode latents.

The folder is the ``StableDiffusionPipeline.save_pretrained`` layout (model_index.json, unet/,
vae/, text_encoder/, tokenizer/, scheduler/). Each component is read with its own library's
``from_pretrained`` from local files only (safetensors weights; nothing is downloaded).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..io.atomic import CheckpointError

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class T2IPipeline:
    """The parts of an SD-style pipeline that SFD uses; ``scheduler_config`` is a plain dict."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler_config: dict
    path: Path | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Text embeddings (N, L, D) of N prompts (CLIP last hidden state, padded to L tokens).

        Each distinct prompt is encoded once per pipeline and cached (the run's prompts are fixed).
        """
        if isinstance(prompts, str):
            raise TypeError(f"encode_prompts takes a list of prompts, got the string {prompts!r}")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            device = next(self.text_encoder.parameters()).device
            hidden = self.text_encoder(ids.to(device))[0].float()
            self._cache.update(zip(missing, hidden))
        return torch.stack([self._cache[p] for p in prompts])

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from SD latents (B, 4, h, w) (unscaled by the VAE factor)."""
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode((latents / self.vae_scaling_factor).to(vae_dtype)).sample
        return images.float().clamp(-1, 1)


def load_t2i_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> T2IPipeline:
    """Read a local SD-style pipeline folder; frozen VAE and text encoder in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a diffusers pipeline folder: model_index.json is missing "
                              f"(expected the StableDiffusionPipeline layout with {', '.join(PIPELINE_PARTS)})")
    missing = [p for p in PIPELINE_PARTS if not (path / p).is_dir()]
    if missing:
        raise CheckpointError(f"pipeline folder {str(path)!r} lacks the subfolder(s) {missing}; "
                              f"needed: {list(PIPELINE_PARTS)}")
    try:
        # Low-memory loading only where accelerate is installed: without it diffusers prints a notice per model.
        quiet = {"low_cpu_mem_usage": is_accelerate_available()}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, torch_dtype=dtype,
                                                    **quiet)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True, torch_dtype=dtype, **quiet)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True,
                                                     dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except Exception as exc:  # diffusers/transformers raise many types for a broken folder
        raise CheckpointError(f"could not load the pipeline in {str(path)!r}: {exc}") from exc
    for module in (vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return T2IPipeline(unet.to(device).eval(), vae, text_encoder, tokenizer, scheduler_config, path)


__all__ = ["T2IPipeline", "load_t2i_pipeline", "PIPELINE_PARTS"]
