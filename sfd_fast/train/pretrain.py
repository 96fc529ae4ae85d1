"""Teacher pretraining with the EDM denoising loss (the loss the fake score also uses)."""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from ..core.ema import ema_beta, update_ema
from ..core.losses import edm_denoising_loss, edm_loss_weight, edm_training_sigma
from ..models.networks import EDMDenoiser
from ..models.unet import UNetConfig, build_unet


def pretrain_teacher(images: torch.Tensor, labels: torch.Tensor, unet_config: UNetConfig, *,
                     steps: int = 4000, batch_size: int = 128, lr: float = 1e-3, warmup_steps: int = 200,
                     ema_halflife_kimg: float = 50.0, sigma_data: float = 0.5, p_mean: float = -1.2,
                     p_std: float = 1.2, seed: int = 0, progress: bool = True) -> EDMDenoiser:
    """Train a class-conditional EDM denoiser on (N, C, H, W) images in [-1, 1]; returns its EMA."""
    expected = (unet_config.channels, unet_config.resolution, unet_config.resolution)
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f"images have shape {tuple(images.shape[1:])} per sample but the UNet config "
                         f"expects {expected}")
    if int(labels.max()) >= unet_config.num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for num_classes={unet_config.num_classes}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = EDMDenoiser(build_unet(unet_config), sigma_data).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps))
    seen = 0
    with tqdm(range(steps), desc="teacher", disable=not progress) as bar:
        for _ in bar:
            idx = torch.randint(len(images), (batch_size,), generator=gen)
            x0, c = images[idx], labels[idx]
            sigma = edm_training_sigma(batch_size, p_mean, p_std, generator=gen)
            noisy = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
            weight = edm_loss_weight(sigma, sigma_data) / batch_size
            loss, _ = edm_denoising_loss(model(noisy, sigma, c), x0, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += batch_size
            update_ema(ema, model, ema_beta(ema_halflife_kimg, 0.05, seen, batch_size))
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return ema
