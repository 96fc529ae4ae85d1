"""Published architectures (diffusers / transformers configs) of real text-to-image teachers.

For memory planning (``scripts/memory_table.py``, docs/memory.md): each preset holds the exact
``config.json`` values of the denoiser and of the frozen text encoders of one public model, so the
architecture can be instantiated on ``torch.device("meta")`` (shapes only, no weights, no hub
access) and its parameters counted exactly. Keys a published ``config.json`` leaves out (or sets to
the class default) take the diffusers / transformers defaults; only architecture keys are copied
(``_class_name``, ``_diffusers_version``, ``torch_dtype`` and the like are dropped).

Text encoders are frozen in SFD and are used only to encode prompts (``encode_prompts`` caches
each distinct prompt's embedding, then the library no longer calls them): ``droppable_after_encoding``
says they can be freed from the GPU once the prompt set is encoded. They are not part of the
three-network footprint; they are listed so a reader can see what a pipeline folder weighs.

Sources (each preset's ``source`` fields repeat them):
- SD1.5 UNet / text encoder: runwayml/stable-diffusion-v1-5 ``unet/config.json`` and
  ``text_encoder/config.json``, as vendored in GitHub repo HDRJ-One/runwayml-stable-diffusion-v1-5
  (commits 2e7465d9 and c612408b).
- SDXL base 1.0: ``unet/config.json`` of stabilityai/stable-diffusion-xl-base-1.0 (diffusers 0.19.0.dev0),
  as re-published in https://huggingface.co/jffacevedo/flax_lcm_unet/raw/cf846497fa4e693d148e9c54a7ee37a76e1062dd/config.json
  (``_name_or_path`` = the SDXL base snapshot 462165984030) and https://huggingface.co/latent-consistency/lcm-sdxl
  commit 7136117e (``_name_or_path`` stabilityai/stable-diffusion-xl-base-1.0); text encoders from
  snapshots of the same repo re-published in https://huggingface.co/stablediffusionapi/stable-diffusion-xl-base-1.0
  (``text_encoder/`` and ``text_encoder_2/config.json``, snapshot f898a3e026).
- SD3-medium: ``transformer/config.json`` of stabilityai/stable-diffusion-3-medium-diffusers, as copied in
  https://huggingface.co/bhoomikagp/sd3-interior-model/blob/main/transformer/config.json (``_name_or_path`` = its
  snapshot ea42f8cef0) and https://huggingface.co/ptx0/sd3-reality-mix commit f4656d50 (diffusers 0.29.0.dev0, the
  release's version); text encoders from the same snapshot (scholar-2001/sd3_nf4_new ``text_encoder``,
  bhoomikagp/sd3-interior-model ``text_encoder_2``, ZhangxinruBIT/trained-sd3 ``text_encoder_3``).
- SD3.5-large: ``transformer/config.json`` of stabilityai/stable-diffusion-3.5-large ("SD3.5 Large Public Release",
  commit 4c4df3f), as mirrored in https://huggingface.co/frankjoshua/stable-diffusion-3.5-large/blob/main/transformer/config.json;
  diffusers' own converter (huggingface/diffusers ``scripts/convert_sd3_to_diffusers.py`` at 3ab805a6) derives the same
  values from the checkpoint (38 layers = heads, caption_projection_dim 2432, pos_embed_max_size 192 for "sd3.0 and
  sd3.5 8b", qk_norm rms_norm, no dual-attention layers). Text encoders: unchanged from SD3-medium (HF blog
  "Diffusers welcomes Stable Diffusion 3.5 Large", https://huggingface.co/blog/sd3-5).
- PixArt-Sigma XL-2 1024-MS: ``transformer/config.json`` of PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, as copied from its
  snapshot e102b3591c in https://huggingface.co/toilaluan/SoraT2I/blob/main/transformer/config.json; the first upload
  (https://huggingface.co/PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/commit/edfd592c29a4bd296030990d87808fc86c804859) has the
  same values without ``use_additional_conditions`` (later set to false: Sigma has no micro-conditions). The authors'
  converter (GitHub PixArt-alpha/PixArt-sigma ``tools/convert_pixart_to_diffusers.py`` at 0c8d0209) writes these values
  (28 layers, 16 x 72 heads, 1152 wide, T5 4096 captions, interpolation_scale 2 at 1024 px). Text encoder: T5 v1.1 XXL
  encoder of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers (snapshot 2c17b4e852, re-published in
  https://huggingface.co/Vargol/PixArt-Sigma_2k_16bit/blob/352e04d610f00ed26510e214844fa8f7ce0cf65f/text_encoder/config.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# ---- text encoders (transformers configs) -------------------------------------------------------

CLIP_L_TEXT = {  # OpenAI CLIP ViT-L/14 text tower (SD1.5, SDXL text_encoder, SD3 text_encoder)
    "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
    "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
OPENCLIP_BIGG_TEXT = {  # OpenCLIP ViT-bigG/14 text tower (SDXL text_encoder_2, SD3 text_encoder_2)
    "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
    "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
T5_V1_1_XXL_ENCODER = {  # google/t5-v1_1-xxl encoder (SD3 text_encoder_3, PixArt-Sigma text_encoder)
    "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu",
    "is_gated_act": True, "layer_norm_epsilon": 1e-06, "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "vocab_size": 32128, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
}


@dataclass(frozen=True)
class TextEncoderSpec:
    """One frozen text encoder of a pipeline (a transformers model class and its config)."""

    component: str            # the pipeline folder's component name (text_encoder, text_encoder_2, ...)
    cls: str                  # transformers class name
    config: dict              # architecture keys of its config.json
    source: str               # where the published values were read
    droppable_after_encoding: bool = True  # SFD never backpropagates into it; free it once prompts are encoded

    def build(self, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> nn.Module:
        """The encoder with uninitialised weights on ``device`` (meta by default: no memory)."""
        import transformers

        model_cls = getattr(transformers, self.cls)
        config_cls = transformers.T5Config if self.cls.startswith("T5") else transformers.CLIPTextConfig
        with torch.device(device):
            return model_cls(config_cls(**self.config)).to(dtype)


# ---- denoisers (diffusers configs) --------------------------------------------------------------

SD15_UNET = {  # runwayml/stable-diffusion-v1-5 unet/config.json (diffusers 0.17.0.dev0 re-save)
    "act_fn": "silu", "addition_embed_type": None, "addition_embed_type_num_heads": 64, "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 768,
    "cross_attention_norm": None,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 64, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": None, "use_linear_projection": False,
}
SDXL_BASE_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (diffusers 0.19.0.dev0)
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SD3_MEDIUM_TRANSFORMER = {  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128,
}
SD35_LARGE_TRANSFORMER = {  # stabilityai/stable-diffusion-3.5-large transformer/config.json (diffusers 0.31.0.dev0)
    "attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 38, "num_layers": 38, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128,
}
PIXART_SIGMA_XL2_1024_TRANSFORMER = {  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
    "attention_type": "default", "caption_channels": 4096, "cross_attention_dim": 1152,
    "double_self_attention": False, "dropout": 0.0, "in_channels": 4, "interpolation_scale": 2,
    "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single",
    "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
    "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 128,
    "upcast_attention": False, "use_additional_conditions": False, "use_linear_projection": False,
}


@dataclass(frozen=True)
class PublishedModel:
    """A public text-to-image model: its denoiser (the network SFD copies three times) and text encoders."""

    name: str                        # preset key
    title: str                       # human name
    hub_id: str                      # Hugging Face repository of the published weights
    denoiser_cls: str                # diffusers class of the denoiser
    denoiser_config: dict            # its config.json (architecture keys)
    denoiser_source: str             # where those values were read
    latent_shape: tuple[int, int, int]  # (C, H, W) latents at the native resolution
    text_tokens: int                 # tokens the denoiser cross-attends to per prompt at the pipeline's defaults
    text_encoders: tuple[TextEncoderSpec, ...] = field(default_factory=tuple)
    published_params: float = 0.0    # the parameter count its authors state for the denoiser
    published_params_source: str = ""

    def build_denoiser(self, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> nn.Module:
        """The denoiser with uninitialised weights on ``device`` (meta by default: shapes only).

        Built with ``from_config``, as ``from_pretrained`` does: keys of the published file that the
        class no longer takes (PixArt's ``double_self_attention``, ...) are ignored the same way.
        """
        import diffusers

        with torch.device(device):
            return getattr(diffusers, self.denoiser_cls).from_config(dict(self.denoiser_config)).to(dtype)

    def denoiser_inputs(self, batch: int, device: torch.device | str = "meta",
                        dtype: torch.dtype = torch.float32) -> dict:
        """Keyword arguments of one denoiser call at the native resolution for ``batch`` samples.

        Conditioning shapes follow each pipeline's defaults: SD1.5 77 CLIP tokens x 768; SDXL 77 x 2048
        plus pooled 1280 and 6 time ids; SD3 77 CLIP + 256 T5 tokens x 4096 and pooled 2048 (its
        ``max_sequence_length=256``); PixArt-Sigma 300 T5 tokens x 4096 with their attention mask.
        """
        c, h, w = self.latent_shape
        x = torch.randn(batch, c, h, w, device=device, dtype=dtype)
        t = torch.full((batch,), 500.0, device=device)
        cfg = self.denoiser_config
        if self.denoiser_cls == "UNet2DConditionModel":
            kwargs = {"sample": x, "timestep": t, "encoder_hidden_states": torch.randn(
                batch, self.text_tokens, cfg["cross_attention_dim"], device=device, dtype=dtype)}
            if cfg.get("addition_embed_type") == "text_time":
                pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                               "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)}
            return kwargs
        if self.denoiser_cls == "SD3Transformer2DModel":
            return {"hidden_states": x, "timestep": t,
                    "encoder_hidden_states": torch.randn(batch, self.text_tokens, cfg["joint_attention_dim"],
                                                         device=device, dtype=dtype),
                    "pooled_projections": torch.randn(batch, cfg["pooled_projection_dim"], device=device, dtype=dtype)}
        if self.denoiser_cls == "PixArtTransformer2DModel":
            return {"hidden_states": x, "timestep": t,
                    "encoder_hidden_states": torch.randn(batch, self.text_tokens, cfg["caption_channels"],
                                                         device=device, dtype=dtype),
                    "encoder_attention_mask": torch.ones(batch, self.text_tokens, device=device, dtype=dtype),
                    "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        raise ValueError(f"no input builder for {self.denoiser_cls}")


def _clip(component: str, config: dict, source: str, with_projection: bool) -> TextEncoderSpec:
    return TextEncoderSpec(component, "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel",
                           config, source)


def _t5(component: str, source: str) -> TextEncoderSpec:
    return TextEncoderSpec(component, "T5EncoderModel", T5_V1_1_XXL_ENCODER, source)


_SD3_TEXT = (
    _clip("text_encoder", CLIP_L_TEXT, "stable-diffusion-3-medium-diffusers text_encoder/config.json (snapshot "
          "ea42f8cef0, copied in huggingface.co/scholar-2001/sd3_nf4_new)", with_projection=True),
    _clip("text_encoder_2", OPENCLIP_BIGG_TEXT, "stable-diffusion-3-medium-diffusers text_encoder_2/config.json "
          "(snapshot ea42f8cef0, copied in huggingface.co/bhoomikagp/sd3-interior-model)", with_projection=True),
    _t5("text_encoder_3", "stable-diffusion-3-medium-diffusers text_encoder_3/config.json (snapshot ea42f8cef0, "
        "copied in huggingface.co/ZhangxinruBIT/trained-sd3)"),
)

PUBLISHED_MODELS: dict[str, PublishedModel] = {m.name: m for m in (
    PublishedModel(
        "sd15", "Stable Diffusion 1.5", "runwayml/stable-diffusion-v1-5", "UNet2DConditionModel", SD15_UNET,
        "runwayml/stable-diffusion-v1-5 unet/config.json, vendored in github.com/HDRJ-One/"
        "runwayml-stable-diffusion-v1-5 @2e7465d9", (4, 64, 64), 77,
        (_clip("text_encoder", CLIP_L_TEXT, "runwayml/stable-diffusion-v1-5 text_encoder/config.json, vendored in "
               "github.com/HDRJ-One/runwayml-stable-diffusion-v1-5 @c612408b", with_projection=False),),
        860e6, "SD v1 model card: 'an 860M UNet and 123M text encoder' (CompVis/stable-diffusion README)"),
    PublishedModel(
        "sdxl", "SDXL base 1.0", "stabilityai/stable-diffusion-xl-base-1.0", "UNet2DConditionModel", SDXL_BASE_UNET,
        "stable-diffusion-xl-base-1.0 unet/config.json (0.19.0.dev0), re-published in huggingface.co/"
        "jffacevedo/flax_lcm_unet @cf846497 and latent-consistency/lcm-sdxl @7136117e", (4, 128, 128), 77,
        (_clip("text_encoder", CLIP_L_TEXT, "stable-diffusion-xl-base-1.0 text_encoder/config.json (snapshot "
               "f898a3e026, re-published in huggingface.co/stablediffusionapi/stable-diffusion-xl-base-1.0)",
               with_projection=False),
         _clip("text_encoder_2", OPENCLIP_BIGG_TEXT, "stable-diffusion-xl-base-1.0 text_encoder_2/config.json "
               "(same snapshot and copy)", with_projection=True)),
        2.6e9, "SDXL paper (Podell et al. 2023), Table 1: 2.6B UNet parameters"),
    PublishedModel(
        "sd3-medium", "Stable Diffusion 3 medium", "stabilityai/stable-diffusion-3-medium-diffusers",
        "SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER,
        "stable-diffusion-3-medium-diffusers transformer/config.json (snapshot ea42f8cef0, copied in "
        "huggingface.co/bhoomikagp/sd3-interior-model; ptx0/sd3-reality-mix @f4656d50)", (16, 128, 128), 77 + 256,
        _SD3_TEXT, 2e9, "HF blog 'Diffusers welcomes Stable Diffusion 3': 'Stable Diffusion 3 Medium, with 2B parameters'"),
    PublishedModel(
        "sd3.5-large", "Stable Diffusion 3.5 large", "stabilityai/stable-diffusion-3.5-large",
        "SD3Transformer2DModel", SD35_LARGE_TRANSFORMER,
        "stable-diffusion-3.5-large transformer/config.json ('SD3.5 Large Public Release' 4c4df3f, mirrored in "
        "huggingface.co/frankjoshua/stable-diffusion-3.5-large); matches diffusers scripts/convert_sd3_to_diffusers.py",
        (16, 128, 128), 77 + 256, _SD3_TEXT, 8e9, "HF blog 'Diffusers welcomes Stable Diffusion 3.5 Large': 'A large (8B) model'"),
    PublishedModel(
        "pixart-sigma", "PixArt-Sigma XL-2 1024-MS", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        "PixArtTransformer2DModel", PIXART_SIGMA_XL2_1024_TRANSFORMER,
        "PixArt-Sigma-XL-2-1024-MS transformer/config.json (snapshot e102b3591c, copied in huggingface.co/toilaluan/"
        "SoraT2I); values written by github.com/PixArt-alpha/PixArt-sigma tools/convert_pixart_to_diffusers.py @0c8d0209",
        (4, 128, 128), 300,
        (_t5("text_encoder", "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers text_encoder/config.json (snapshot "
             "2c17b4e852, re-published in huggingface.co/Vargol/PixArt-Sigma_2k_16bit)"),),
        0.6e9, "PixArt-Sigma paper (Chen et al. 2024): '0.6B parameters'"),
)}


def from_name(name: str) -> PublishedModel:
    try:
        return PUBLISHED_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown published model {name!r}; known: {sorted(PUBLISHED_MODELS)}") from None


__all__ = ["PublishedModel", "TextEncoderSpec", "PUBLISHED_MODELS", "from_name"]
