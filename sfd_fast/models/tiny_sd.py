"""A small random Stable-Diffusion-style pipeline, built and saved locally (tests, bench, docs).

Real diffusers/transformers components from small configs: ``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel`` and a ``CLIPTokenizer`` whose byte-level vocabulary is
written here (one token per byte, no merges), so nothing is downloaded. The folder has the
``StableDiffusionPipeline.save_pretrained`` layout that ``load_t2i_pipeline`` reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TinyPipelineShape:
    """Sizes of the random pipeline (latent side = image side / 2)."""

    latent_size: int = 8                       # latent side; the VAE decodes to twice that
    unet_channels: tuple[int, ...] = (32, 64)  # UNet block_out_channels
    cross_attention_dim: int = 32              # text embedding width D (CLIP hidden size)
    max_length: int = 16                       # tokens per prompt L (CLIP context length)
    text_layers: int = 2                       # CLIP transformer layers


TINY_SHAPES = {
    "tiny": TinyPipelineShape(),
    # The bench's "mid-size" latent model: 16x16x4 latents, 3 levels, ~4M-parameter UNet.
    "mid": TinyPipelineShape(latent_size=16, unet_channels=(64, 128, 128), cross_attention_dim=64, max_length=16),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode map (the tokenizer's base alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def write_byte_vocab(folder: Path) -> tuple[Path, Path, int]:
    """vocab.json + merges.txt of a byte-level CLIP tokenizer without merges; returns vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt", len(vocab)


def build_tiny_pipeline(path: str | os.PathLike, prediction_type: str = "epsilon", shape: str = "tiny",
                        seed: int = 0) -> Path:
    """Build a random SD-style pipeline and ``save_pretrained`` it to ``path``; returns ``path``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    s = TINY_SHAPES[shape]
    path = Path(path)
    torch.manual_seed(seed)
    levels = len(s.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=s.latent_size, in_channels=4, out_channels=4, block_out_channels=s.unet_channels,
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=s.cross_attention_dim, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=2 * s.latent_size)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges, vocab_size = write_byte_vocab(Path(tmp))
        tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=s.max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=s.cross_attention_dim, intermediate_size=2 * s.cross_attention_dim,
        num_hidden_layers=s.text_layers, num_attention_heads=4, max_position_embeddings=s.max_length,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    # SD's training schedule: scaled_linear betas 0.00085..0.012 over 1000 steps.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_clip(path: str | os.PathLike, image_size: int = 32, seed: int = 0) -> Path:
    """A random tiny CLIPModel + byte-level tokenizer saved to ``path`` (tests of CLIP-scored metrics)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges, vocab_size = write_byte_vocab(Path(tmp))
        tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=32)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=32, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **layers),
        vision_config=dict(image_size=image_size, patch_size=8, **layers), projection_dim=16))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


__all__ = ["build_tiny_pipeline", "build_tiny_clip", "TinyPipelineShape", "TINY_SHAPES", "write_byte_vocab"]
