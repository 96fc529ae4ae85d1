"""PixArt-style DiT teachers: a ``PixArtTransformer2DModel`` pipeline folder as SFD's backbone.

PixArt-alpha/sigma are DDPM epsilon-prediction transformers (usually with a learned variance: the
network returns 2C channels, of which the first C are epsilon, as ``PixArtAlphaPipeline`` reads
them), conditioned by cross attention on T5 token embeddings *with their attention mask*. So the
denoiser is ``LatentDenoiser``'s DDPM arithmetic (same sigma -> timestep lookup, same CFG) over
another network call: ``PixArtDenoiser``. The mask travels inside the condition as the pooled slot
of ``PackedText`` (L values behind the L token rows), so forget/override swaps and the fake score's
prompt drop move embeddings and masks together. At ``sample_size`` 128 (PixArt-alpha 1024) the
transformer also takes micro-conditions (resolution, aspect ratio), fixed here to the default
image size as the stock pipeline passes them.

The folder is the ``PixArtAlphaPipeline.save_pretrained`` layout: model_index.json, transformer/,
vae/, text_encoder/ (T5EncoderModel), tokenizer/ (T5), scheduler/ (a DDPM-family scheduler).
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

PIXART_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIXART_CONDITIONING = ("caption_channels", "cross_attention_dim")
MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline's default T5 length; capped by the tokenizer's own


def require_pixart_conditioning(config: dict, where: str) -> None:
    missing = [k for k in PIXART_CONDITIONING if config.get(k) is None]
    if missing or config.get("norm_type") != "ada_norm_single":
        lacks = ", ".join(missing) if missing else f"norm_type={config.get('norm_type')!r}"
        raise ValueError(f"{where} ({config.get('_class_name')}) lacks the conditioning a PixArt teacher needs "
                         f"({lacks}); supported: PixArtTransformer2DModel (caption_channels T5 cross attention, "
                         "norm_type 'ada_norm_single')")


class PixArtDenoiser(LatentDenoiser):
    """D(x, sigma, c) over a DDPM PixArt transformer: c packs T5 tokens (B, L, D) and their mask (B, L)."""

    kind = "pixart"
    network_subfolder = "transformer"

    def __init__(self, transformer: nn.Module, scheduler_config: dict, layout: PackedText, image_size: int,
                 guidance_scale: float = 1.0, negative_embedding: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        GuidedTextDenoiser.__init__(self)
        require_pixart_conditioning(dict(transformer.config), type(transformer).__name__)
        self._init_schedule(scheduler_config)
        if layout.width != int(transformer.config.caption_channels) or layout.pooled_dim != layout.length:
            raise ValueError(f"text layout {layout} does not fit a PixArt transformer with caption_channels "
                             f"{transformer.config.caption_channels} (the pooled slot holds the L-long mask)")
        self.transformer = transformer
        self.layout = layout
        self.image_size = int(image_size)  # pixels: the micro-condition resolution at sample_size 128
        self._init_guidance(guidance_scale, negative_embedding, compute_dtype)

    @property
    def network(self) -> nn.Module:
        return self.transformer

    def stock_call_kwargs(self) -> dict:
        # Binning only knows sample sizes 32/64/128 and would resize others; our encoding skips caption
        # cleaning (it needs bs4/ftfy) and uses the layout's T5 length.
        return {"max_sequence_length": self.layout.length, "use_resolution_binning": False, "clean_caption": False}

    def network_call(self, x_in: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        hidden, mask = self.layout.unpack(c)
        added = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            n = x_in.shape[0]
            added = {"resolution": x_in.new_tensor([[self.image_size, self.image_size]]).expand(n, 2),
                     "aspect_ratio": x_in.new_ones(n, 1)}
        out = self.transformer(x_in, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=t,
                               added_cond_kwargs=added, return_dict=False)[0]
        channels = x_in.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out  # learned sigma: epsilon is the first half


@dataclass
class PixArtT2IPipeline(WrappedDiffusersPipeline):
    """The parts of a PixArtAlphaPipeline that SFD uses (``pipe`` is the diffusers pipeline itself)."""

    pipe: object
    max_sequence_length: int
    path: Path | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    kind = "pixart"
    pipeline_class = "PixArtAlphaPipeline"
    network_subfolder = "transformer"

    @property
    def layout(self) -> PackedText:
        return PackedText(self.max_sequence_length, int(self.network.config.caption_channels), self.max_sequence_length)

    def _encode_new(self, prompts: list[str]) -> torch.Tensor:
        """Packed conditions (N, 2L/D-rounded, D): T5 token embeddings, then their attention mask."""
        device = next(self.pipe.text_encoder.parameters()).device
        hidden, mask, _, _ = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=device, clean_caption=False,
            max_sequence_length=self.max_sequence_length)
        return self.layout.pack(hidden.float(), mask.float())

    def make_denoiser(self, guidance_scale: float = 1.0, negative_embedding: torch.Tensor | None = None,
                      network: nn.Module | None = None) -> PixArtDenoiser:
        return PixArtDenoiser(network if network is not None else self.network, self.scheduler_config, self.layout,
                              int(self.network.config.sample_size) * self.pipe.vae_scale_factor, guidance_scale,
                              negative_embedding)


def load_pixart_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> PixArtT2IPipeline:
    """Read a local PixArtAlphaPipeline folder; frozen VAE and T5 in eval mode."""
    from diffusers import PixArtAlphaPipeline

    path = Path(path)
    transformer_config, scheduler_config = read_folder_configs(
        path, PIXART_PARTS, "PixArt pipeline", ("transformer/config.json", "scheduler/scheduler_config.json"))
    require_pixart_conditioning(transformer_config, f"the transformer in {str(path / 'transformer')!r}")
    require_ddpm_schedule(scheduler_config, "a PixArtAlphaPipeline teacher (PixArtDenoiser)")
    pipe = load_frozen_pipeline(PixArtAlphaPipeline, path, "PixArt pipeline", device, dtype,
                                PixArtT2IPipeline.network_subfolder, ("vae", "text_encoder"))
    length = min(MAX_SEQUENCE_LENGTH, int(pipe.tokenizer.model_max_length))
    return PixArtT2IPipeline(pipe, length, path)


__all__ = ["PixArtDenoiser", "PixArtT2IPipeline", "load_pixart_pipeline", "require_pixart_conditioning",
           "PIXART_PARTS"]
