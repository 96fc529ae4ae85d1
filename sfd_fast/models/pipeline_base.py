"""What every text-to-image backbone's pipeline object shares, and how its folder is read.

A backbone's pipeline object (``sd_pipeline.T2IPipeline``, ``sdxl.SDXLT2IPipeline``,
``sd3_pipeline.SD3T2IPipeline``, ``pixart.PixArtT2IPipeline``) encodes each distinct prompt once
and caches it (a run's prompts are fixed), and decodes latents with the VAE; its subclass says how
a batch of new prompts becomes one condition tensor per prompt (``_encode_new``). Folders are read
in two stages so that a wrong folder fails before any weight loads: ``read_folder_configs`` checks
the subfolders and reads the JSON configs the backbone validates, then ``load_frozen_pipeline``
runs diffusers' own ``from_pretrained`` (local safetensors only) and freezes the VAE and encoders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..io.atomic import CheckpointError


class TextToImagePipeline:
    """Prompt cache, device, generator and decode of a backbone; subclasses are dataclasses with ``_cache``.

    Subclasses set ``kind``, ``pipeline_class`` (the diffusers class name of their folders),
    ``network_subfolder``, the properties ``network`` and ``vae``, and ``_encode_new``.
    """

    _cache: dict  # prompt -> condition (one sample), a dataclass field of each subclass

    def _encode_new(self, prompts: list[str]):
        """One condition tensor per prompt (stacked (N, ...) or a list), for prompts not yet cached."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Conditions (N, L, D) of N prompts; each distinct prompt is encoded once per pipeline and cached."""
        if isinstance(prompts, str):
            raise TypeError(f"encode_prompts takes a list of prompts, got the string {prompts!r}")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            self._cache.update(zip(missing, self._encode_new(missing)))
        return torch.stack([self._cache[p] for p in prompts])

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def make_generator(self, denoiser, sigma_init: float):
        """G(z, c) = D(sigma_init z, sigma_init, c) over ``denoiser`` (flow backbones override the input scaling)."""
        from .networks import OneStepGenerator

        return OneStepGenerator(denoiser, sigma_init)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from model-space latents (B, C, h, w), unscaled by the VAE factor
        as the SD, SDXL and PixArt pipelines do (SD3's pipeline also shifts: ``SD3T2IPipeline.decode``)."""
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode((latents / self.vae_scaling_factor).to(vae_dtype)).sample
        return images.float().clamp(-1, 1)


class WrappedDiffusersPipeline(TextToImagePipeline):
    """A backbone that keeps the diffusers pipeline itself (``pipe``) and reads its parts from it."""

    pipe: object  # a dataclass field of each subclass

    @property
    def network(self) -> nn.Module:
        return getattr(self.pipe, self.network_subfolder)

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def scheduler_config(self) -> dict:
        return {**self.pipe.scheduler.config, "_class_name": type(self.pipe.scheduler).__name__}


def read_folder_configs(path: Path, parts: tuple[str, ...], label: str, configs: tuple[str, ...],
                        note: str = "") -> list[dict]:
    """The JSON ``configs`` (paths inside the folder) of a pipeline folder that has every subfolder of ``parts``.

    CheckpointError naming what is missing or unreadable; ``label`` names the folder in messages
    ("SDXL pipeline"), ``note`` is appended to the list of needed parts.
    """
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise CheckpointError(f"{label} folder {str(path)!r} lacks the subfolder(s) {missing}; "
                              f"needed: {list(parts)}{note}")
    try:
        return [json.loads((path / name).read_text()) for name in configs]
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not read {' and '.join(configs)} in {str(path)!r}: {exc}") from exc


def freeze(device: str | torch.device, *modules: nn.Module | None) -> None:
    """Move the never-trained parts (VAE, text encoders) to ``device``, eval mode, no gradients; None is skipped."""
    for module in modules:
        if module is not None:
            module.to(device).eval().requires_grad_(False)


def load_frozen_pipeline(pipeline_class, path: Path, label: str, device: str | torch.device, dtype: torch.dtype,
                         network: str, frozen: tuple[str, ...], **kwargs):
    """``pipeline_class.from_pretrained(path)`` (local safetensors) with its ``frozen`` parts frozen on ``device``
    and its ``network`` (the subfolder name: "unet", "transformer") on ``device`` in eval mode; no progress bars.

    A part named in ``frozen`` that the folder does not have (SD3's optional T5) is skipped.
    """
    from diffusers.utils import is_accelerate_available

    try:
        # Low-memory loading only where accelerate is installed: without it diffusers prints a notice per model.
        pipe = pipeline_class.from_pretrained(path, use_safetensors=True, dtype=dtype,
                                              low_cpu_mem_usage=is_accelerate_available(), **kwargs)
    except Exception as exc:  # diffusers/transformers raise many types for a broken folder
        raise CheckpointError(f"could not load the {label} in {str(path)!r}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    freeze(device, *(getattr(pipe, name, None) for name in frozen))
    getattr(pipe, network).to(device).eval()
    return pipe


__all__ = ["TextToImagePipeline", "WrappedDiffusersPipeline", "read_folder_configs", "freeze",
           "load_frozen_pipeline"]
