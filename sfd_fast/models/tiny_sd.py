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


def _byte_clip_tokenizer(max_length: int):
    """(CLIPTokenizer over the byte vocabulary, its vocabulary size)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges, vocab_size = write_byte_vocab(Path(tmp))
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=max_length), vocab_size


def _clip_text_config(vocab_size: int, width: int, max_length: int, layers: int = 2, **extra):
    """A small CLIP text encoder config over the byte vocabulary (its last two ids: start/end, end pads)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=max_length,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                          **extra)


def _tiny_vae(latent_size: int, latent_channels: int = 4, **extra):
    """A two-level AutoencoderKL whose images are twice the latent side."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=2 * latent_size, **extra)


def build_tiny_pipeline(path: str | os.PathLike, prediction_type: str = "epsilon", shape: str = "tiny",
                        seed: int = 0) -> Path:
    """Build a random SD-style pipeline and ``save_pretrained`` it to ``path``; returns ``path``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    s = TINY_SHAPES[shape]
    path = Path(path)
    torch.manual_seed(seed)
    levels = len(s.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=s.latent_size, in_channels=4, out_channels=4, block_out_channels=s.unet_channels,
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=s.cross_attention_dim, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1))
    vae = _tiny_vae(s.latent_size)
    tokenizer, vocab_size = _byte_clip_tokenizer(s.max_length)
    text_encoder = CLIPTextModel(_clip_text_config(vocab_size, s.cross_attention_dim, s.max_length, s.text_layers))
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
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer, vocab_size = _byte_clip_tokenizer(32)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=32, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **layers),
        vision_config=dict(image_size=image_size, patch_size=8, **layers), projection_dim=16))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def byte_t5_tokenizer(max_length: int):
    """A T5 (unigram) tokenizer over single characters, built from a vocabulary list (no download)."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(ch, -2.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


@dataclass(frozen=True)
class TinySD3Shape:
    """Sizes of the random SD3 pipeline (two CLIP encoders of width ``clip_width``, T5 of width 2 x that)."""

    latent_size: int = 8       # latent side; the VAE decodes to twice that
    latent_channels: int = 4   # SD3 itself has 16
    layers: int = 2            # joint transformer blocks
    heads: int = 4             # attention heads of head_dim 8
    clip_width: int = 32       # hidden size = projection dim of each CLIP text encoder
    max_length: int = 16       # tokens per prompt of each encoder (CLIP context, T5 max_sequence_length)


def _byte_clip(s_width: int, max_length: int, layers: int = 2):
    """(CLIPTextModelWithProjection, CLIPTokenizer) random and byte-level, as SD3/SDXL's text encoders."""
    from transformers import CLIPTextModelWithProjection

    tokenizer, vocab_size = _byte_clip_tokenizer(max_length)
    encoder = CLIPTextModelWithProjection(_clip_text_config(vocab_size, s_width, max_length, layers,
                                                            projection_dim=s_width))
    return encoder, tokenizer


def _tiny_t5(tokenizer, width: int):
    """A random two-layer T5EncoderModel of width ``width`` over ``tokenizer``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def build_tiny_sd3_pipeline(path: str | os.PathLike, shape: TinySD3Shape = TinySD3Shape(), seed: int = 0,
                            shift: float = 3.0) -> Path:
    """A random ``StableDiffusion3Pipeline`` (joint-attention transformer, CLIP-L/G-like + T5 encoders, pooled
    projections, flow-matching scheduler with SD3's ``shift``) saved with ``save_pretrained`` to ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    s, path = shape, Path(path)
    torch.manual_seed(seed)
    joint = 2 * s.clip_width  # SD3 concatenates the two CLIP hidden states and pads them to T5's width
    transformer = SD3Transformer2DModel(
        sample_size=s.latent_size, patch_size=1, in_channels=s.latent_channels, out_channels=s.latent_channels,
        num_layers=s.layers, attention_head_dim=8, num_attention_heads=s.heads, joint_attention_dim=joint,
        caption_projection_dim=8 * s.heads, pooled_projection_dim=2 * s.clip_width, pos_embed_max_size=2 * s.latent_size)
    vae = _tiny_vae(s.latent_size, s.latent_channels, scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False,
                    use_post_quant_conv=False)
    text_encoder, tokenizer = _byte_clip(s.clip_width, s.max_length)
    text_encoder_2, tokenizer_2 = _byte_clip(s.clip_width, s.max_length)
    tokenizer_3 = byte_t5_tokenizer(s.max_length)
    text_encoder_3 = _tiny_t5(tokenizer_3, joint)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_pixart_pipeline(path: str | os.PathLike, latent_size: int = 8, max_length: int = 16,
                               seed: int = 0) -> Path:
    """A random ``PixArtAlphaPipeline`` (DiT with learned sigma, T5 text encoder + character T5 tokenizer,
    DPM-Solver scheduler on PixArt's linear betas, epsilon prediction) saved to ``path``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    path = Path(path)
    torch.manual_seed(seed)
    width = 32
    transformer = PixArtTransformer2DModel(
        sample_size=latent_size, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=width, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)
    vae = _tiny_vae(latent_size)
    tokenizer = byte_t5_tokenizer(max_length)
    text_encoder = _tiny_t5(tokenizer, width)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon")
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sdxl_pipeline(path: str | os.PathLike, latent_size: int = 8, max_length: int = 16,
                             prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A random ``StableDiffusionXLPipeline`` (text_time UNet, CLIPTextModel + CLIPTextModelWithProjection,
    SDXL's scaled-linear Euler scheduler) saved to ``path``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    width, time_dim = 32, 8
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_dim + width, cross_attention_dim=2 * width, norm_num_groups=8)
    vae = _tiny_vae(latent_size)
    tokenizer, vocab_size = _byte_clip_tokenizer(max_length)
    text_encoder = CLIPTextModel(_clip_text_config(vocab_size, width, max_length))
    text_encoder_2, tokenizer_2 = _byte_clip(width, max_length)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


__all__ = ["build_tiny_pipeline", "build_tiny_clip", "TinyPipelineShape", "TINY_SHAPES", "write_byte_vocab",
           "build_tiny_sd3_pipeline", "TinySD3Shape", "byte_t5_tokenizer", "build_tiny_pixart_pipeline",
           "build_tiny_sdxl_pipeline"]
