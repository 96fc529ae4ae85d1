"""Load a text-to-image pipeline folder by its class; the Stable-Diffusion (SD1.x) pipeline object.

``load_t2i_pipeline`` reads model_index.json's ``_class_name`` and hands SDXL, SD3 and PixArt
folders to their own loaders. An SD1.x folder is the ``StableDiffusionPipeline.save_pretrained``
layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/); each component is
read with its own library's ``from_pretrained`` from local files only (safetensors weights;
nothing is downloaded). Prompt caching and decoding are ``pipeline_base.TextToImagePipeline``'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..io.atomic import CheckpointError
from .pipeline_base import TextToImagePipeline, freeze, read_folder_configs

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class T2IPipeline(TextToImagePipeline):
    """The parts of an SD-style pipeline that SFD uses; ``scheduler_config`` is a plain dict."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler_config: dict
    path: Path | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    kind = "sd"
    pipeline_class = "StableDiffusionPipeline"
    network_subfolder = "unet"

    @property
    def network(self) -> nn.Module:
        return self.unet

    def make_denoiser(self, guidance_scale: float = 1.0, negative_embedding: torch.Tensor | None = None,
                      network: nn.Module | None = None):
        """The x0 denoiser over this pipeline's UNet (or ``network``, a UNet of the same config)."""
        from .latent_denoiser import LatentDenoiser

        return LatentDenoiser(network if network is not None else self.unet, self.scheduler_config, guidance_scale,
                              negative_embedding)

    def call_kwargs(self) -> dict:
        """Arguments of the stock pipeline call that our encoding assumes (none for SD1.x)."""
        return {}

    def _encode_new(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (N, L, D): CLIP's last hidden state, padded to L tokens."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0].float()


# model_index.json "_class_name" -> loader; anything else is refused with this list.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                       "PixArtAlphaPipeline")


def pipeline_class_name(path: str | os.PathLike) -> str | None:
    """The ``_class_name`` of a diffusers folder's model_index.json (None if unreadable)."""
    try:
        return json.loads((Path(path) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def load_t2i_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32):
    """Read a local text-to-image pipeline folder; frozen VAE and text encoder(s) in eval mode.

    ``StableDiffusionPipeline`` folders give a ``T2IPipeline`` (UNet, DDPM-family schedule);
    ``StableDiffusion3Pipeline`` folders an ``sd3_pipeline.SD3T2IPipeline`` (flow transformer);
    ``PixArtAlphaPipeline`` folders a ``pixart.PixArtT2IPipeline`` (DDPM DiT with T5 and its mask);
    ``StableDiffusionXLPipeline`` folders an ``sdxl.SDXLT2IPipeline`` (two encoders, added conditions).
    Any other pipeline class is a ValueError naming the supported ones.
    """
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a diffusers pipeline folder: model_index.json is missing "
                              f"(expected a save_pretrained folder of one of {', '.join(SUPPORTED_PIPELINES)})")
    name = pipeline_class_name(path)
    if name == "StableDiffusion3Pipeline":
        from .sd3_pipeline import load_sd3_pipeline

        return load_sd3_pipeline(path, device, dtype)
    if name == "StableDiffusionXLPipeline":
        from .sdxl import load_sdxl_pipeline

        return load_sdxl_pipeline(path, device, dtype)
    if name == "PixArtAlphaPipeline":
        from .pixart import load_pixart_pipeline

        return load_pixart_pipeline(path, device, dtype)
    if name != "StableDiffusionPipeline":
        raise ValueError(f"{str(path)!r} holds a {name} folder, which text-to-image SFD does not support; "
                         f"supported pipeline classes: {', '.join(SUPPORTED_PIPELINES)}")
    return _load_sd_pipeline(path, device, dtype)


def _load_sd_pipeline(path: Path, device, dtype) -> T2IPipeline:
    # Component by component, not StableDiffusionPipeline.from_pretrained: only the parts SFD uses are read
    # (a folder's safety checker and feature extractor are not).
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextModel, CLIPTokenizer

    from .latent_denoiser import require_ddpm_schedule

    (scheduler_config,) = read_folder_configs(path, PIPELINE_PARTS, "pipeline", ("scheduler/scheduler_config.json",))
    require_ddpm_schedule(scheduler_config, "a StableDiffusionPipeline (UNet) teacher")  # before any weight loads
    try:
        # Low-memory loading only where accelerate is installed: without it diffusers prints a notice per model.
        quiet = {"low_cpu_mem_usage": is_accelerate_available()}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, torch_dtype=dtype,
                                                    **quiet)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True, torch_dtype=dtype, **quiet)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True,
                                                     dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    except Exception as exc:  # diffusers/transformers raise many types for a broken folder
        raise CheckpointError(f"could not load the pipeline in {str(path)!r}: {exc}") from exc
    freeze(device, vae, text_encoder)
    return T2IPipeline(unet.to(device).eval(), vae, text_encoder, tokenizer, scheduler_config, path)


__all__ = ["T2IPipeline", "load_t2i_pipeline", "PIPELINE_PARTS", "SUPPORTED_PIPELINES", "pipeline_class_name"]
