"""The diffusers UNet2DModel behind every class-conditional denoiser: shape config, presets, builder,
and the residual-block dropout of the networks SFD trains."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the diffusers ``UNet2DModel`` behind every denoiser (teacher, fake score, G)."""

    resolution: int = 16                    # image side in pixels
    channels: int = 1                       # image channels
    num_classes: int = 10                   # class-conditioning vocabulary (nn.Embedding)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # channels per resolution level
    attention_levels: tuple[bool, ...] = (False, False, True)  # self-attention per down block
    layers_per_block: int = 1               # resnet blocks per level
    norm_num_groups: int = 8                # GroupNorm groups
    attention_head_dim: int = 32            # channels per attention head
    dropout: float = 0.0                    # ours: a fresh UNet without dropout; SFDConfig.train_dropout sets it on the trained copies

    def __post_init__(self) -> None:
        _check(len(self.block_out_channels) == len(self.attention_levels),
               f"attention_levels has {len(self.attention_levels)} entries but "
               f"block_out_channels has {len(self.block_out_channels)}; they must match")
        down = 2 ** (len(self.block_out_channels) - 1)
        _check(self.resolution % down == 0,
               f"resolution {self.resolution} must be divisible by {down} "
               f"({len(self.block_out_channels)} levels halve it {len(self.block_out_channels) - 1} times)")
        _check(self.num_classes >= 2, f"num_classes must be >= 2, got {self.num_classes}")
        _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               f"every entry of block_out_channels {self.block_out_channels} must be divisible "
               f"by norm_num_groups={self.norm_num_groups}")

    @classmethod
    def from_name(cls, name: str) -> "UNetConfig":
        try:
            return UNET_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown UNet preset {name!r}; known: {sorted(UNET_PRESETS)}") from None


UNET_PRESETS: dict[str, UNetConfig] = {
    # Unit tests: a few thousand parameters, 8x8 images.
    "tiny": UNetConfig(resolution=8, block_out_channels=(16, 32), attention_levels=(False, True),
                       attention_head_dim=16),
    # The embedded CPU demo: 16x16 MNIST, ~1M parameters.
    "demo": UNetConfig(),
    # GPU benchmark scale: CIFAR-10-like 32x32 RGB, ~50M parameters (EDM DDPM++ ballpark).
    "cifar": UNetConfig(resolution=32, channels=3, block_out_channels=(128, 256, 256, 256),
                        attention_levels=(False, True, False, False), layers_per_block=2,
                        norm_num_groups=32, attention_head_dim=64),
}


class LabelOrVectorEmbedding(nn.Embedding):
    """``nn.Embedding`` that passes float inputs through, so c may be labels or embeddings.

    Same parameter name and shape as diffusers' class embedding, so checkpoints are unchanged.
    """

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return c if c.is_floating_point() else super().forward(c)


def _require_class_conditioning(unet: nn.Module, where: str = "the UNet") -> None:
    config = unet.config
    if getattr(unet, "class_embedding", None) is None or config.get("num_class_embeds") is None:
        raise ValueError(
            f"{where} has no class conditioning (config num_class_embeds="
            f"{config.get('num_class_embeds')!r}, class_embed_type={config.get('class_embed_type')!r}); "
            "SFD needs a class-conditional model: build it with num_class_embeds=<number of classes>")
    if not isinstance(unet.class_embedding, LabelOrVectorEmbedding):
        old = unet.class_embedding
        new = LabelOrVectorEmbedding(old.num_embeddings, old.embedding_dim,
                                     device=old.weight.device, dtype=old.weight.dtype)
        new.weight = old.weight
        unet.class_embedding = new


def resize_class_table(unet: nn.Module, rows: int, extra_row: torch.Tensor | None = None) -> nn.Module:
    """A copy of a class-conditional UNet2DModel with ``rows`` class-embedding rows: the first rows of
    its table, then ``extra_row`` when it grows by one (the null label of label-dropout teachers)."""
    from diffusers import UNet2DModel

    old = int(unet.config.num_class_embeds)
    table = unet.class_embedding.weight.detach()
    if rows == old + 1 and extra_row is not None:
        new_table = torch.cat([table, extra_row.reshape(1, -1).to(table)])
    elif rows < old and extra_row is None:
        new_table = table[:rows]
    else:
        raise ValueError(f"resize_class_table: {old} -> {rows} rows needs extra_row exactly when growing by one")
    resized = UNet2DModel.from_config({**dict(unet.config), "num_class_embeds": rows})
    state = unet.state_dict()
    state["class_embedding.weight"] = new_table
    resized.load_state_dict(state)
    _require_class_conditioning(resized)
    if table.dtype != resized.dtype:  # ModelMixin.to(dtype) logs a warning even with nothing kept in fp32
        resized = resized.to(dtype=table.dtype)
    return resized.to(device=table.device).train(unet.training)


def unet_image_shape(unet: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the images a diffusers UNet takes (``sample_size`` may be an int or a pair)."""
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return (int(unet.config.in_channels), int(size), int(size))


def build_unet(config: UNetConfig):
    """A fresh class-conditional diffusers ``UNet2DModel`` with the given shape."""
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    return UNet2DModel(
        sample_size=config.resolution, in_channels=config.channels, out_channels=config.channels,
        block_out_channels=config.block_out_channels, down_block_types=down, up_block_types=up,
        layers_per_block=config.layers_per_block, norm_num_groups=config.norm_num_groups,
        attention_head_dim=config.attention_head_dim, num_class_embeds=config.num_classes,
        dropout=config.dropout)


class SeededDropout(nn.Dropout):
    """``nn.Dropout`` whose masks come from a given ``torch.Generator`` (the training state's).

    ``F.dropout`` takes no generator and draws from torch's global one, so a run with dropout
    would not be repeated by its seed; with the state's generator it is, and the generator's
    state is checkpointed like the others. Same distribution as ``nn.Dropout`` (keep with
    probability 1 - p, kept values scaled by 1 / (1 - p)), not the same numbers. The mask is
    drawn in the logical (N, C, H, W) order, so a channels_last input gets the same mask.
    """

    def __init__(self, p: float, generator: torch.Generator):
        super().__init__(p)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def set_training_dropout(module: nn.Module, p: float, generator: torch.Generator) -> int:
    """Give every diffusers ``ResnetBlock2D`` in ``module`` a ``SeededDropout(p, generator)``; returns how many.

    Residual blocks are where EDM's (SiD's) and DDIM's (SFD DDPM code's) networks apply their
    dropout, between the second normalisation and the second convolution, which is where
    diffusers' ResnetBlock2D has its ``dropout``. Attention dropout is left as it is. Raises if
    the module has no such block (the setting would silently do nothing).
    """
    from diffusers.models.resnet import ResnetBlock2D

    count = 0
    for block in module.modules():
        if isinstance(block, ResnetBlock2D) and isinstance(getattr(block, "dropout", None), nn.Dropout):
            block.dropout = SeededDropout(p, generator)
            count += 1
    if count == 0:
        raise ValueError(f"train_dropout={p} was requested but {type(module).__name__} has no diffusers "
                         "ResnetBlock2D with a dropout layer to set; use train_dropout=None")
    return count
