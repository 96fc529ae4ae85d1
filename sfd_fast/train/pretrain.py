"""Teacher pretraining with the EDM denoising loss (the loss the fake score also uses)."""

from __future__ import annotations

import copy
import dataclasses

import torch
from tqdm.auto import tqdm

from ..core.ema import ema_beta, update_ema
from ..core.losses import edm_denoising_loss, edm_loss_weight, edm_training_sigma
from ..models.networks import EDMDenoiser
from ..models.unet import UNetConfig, build_unet, resize_class_table


def pretrain_teacher(images: torch.Tensor, labels: torch.Tensor, unet_config: UNetConfig, *,
                     steps: int = 4000, batch_size: int = 128, lr: float = 1e-3, warmup_steps: int = 200,
                     ema_halflife_kimg: float = 50.0, sigma_data: float = 0.5, p_mean: float = -1.2,
                     p_std: float = 1.2, label_dropout: float = 0.0, init: EDMDenoiser | None = None,
                     null_row_only: bool = False, seed: int = 0, progress: bool = True) -> EDMDenoiser:
    """Train a class-conditional EDM denoiser on (N, C, H, W) images in [-1, 1]; returns its EMA.

    ``label_dropout`` p > 0 replaces each label by a null label with probability p (classifier-free
    guidance training, Ho & Salimans 2022; ~0.1 is the usual value), so the teacher also gives the
    unconditional score: the null label is an extra last embedding row (DiT's layout), recorded as
    ``null_label`` and saved in the folder's sfd_fast.json. ``init``: continue from this teacher
    instead of a fresh UNet (a teacher without a null row gets one, started at the mean class row).

    ``null_row_only`` (needs ``init``): every label is the null label and only its embedding row
    trains; every other weight stays as it is, so each class-conditional output is unchanged
    bit for bit and the teacher's quality is kept by construction. The unconditional score is
    then as good as one embedding vector into the frozen network can make it.
    """
    expected = (unet_config.channels, unet_config.resolution, unet_config.resolution)
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f"images have shape {tuple(images.shape[1:])} per sample but the UNet config "
                         f"expects {expected}")
    if int(labels.max()) >= unet_config.num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for num_classes={unet_config.num_classes}")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1) (0.1 is the usual CFG value), got {label_dropout}")
    if null_row_only and (init is None or label_dropout > 0):
        raise ValueError("null_row_only trains the null row of an init teacher: give init and no label_dropout "
                         f"(every label is the null), got init={'set' if init is not None else None}, "
                         f"label_dropout={label_dropout}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if init is not None:
        model = copy.deepcopy(init).train().requires_grad_(True)
        if (label_dropout > 0 or null_row_only) and model.null_label is None:
            model = with_null_row(model)
    else:
        config = unet_config if label_dropout == 0 else dataclasses.replace(unet_config,
                                                                             num_classes=unet_config.num_classes + 1)
        model = EDMDenoiser(build_unet(config), sigma_data,
                            null_label=None if label_dropout == 0 else unet_config.num_classes).train()
    if model.num_classes != unet_config.num_classes:
        raise ValueError(f"the init teacher has {model.num_classes} classes, the data {unet_config.num_classes}")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = list(model.parameters())
    if null_row_only:
        params = [_only_the_null_row_trains(model)]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps))
    seen = 0
    with tqdm(range(steps), desc="teacher", disable=not progress) as bar:
        for _ in bar:
            idx = torch.randint(len(images), (batch_size,), generator=gen)
            x0, c = images[idx], labels[idx]
            if null_row_only:
                c = torch.full_like(c, model.null_label)
            elif label_dropout > 0:
                drop = torch.rand(batch_size, generator=gen) < label_dropout
                c = torch.where(drop, torch.full_like(c, model.null_label), c)
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


def _only_the_null_row_trains(model: EDMDenoiser) -> torch.nn.Parameter:
    """Freeze every weight but the class table, and mask the table's gradient to the null row.

    The other rows get an exact zero gradient at every step, so Adam (zero moments) never moves them.
    """
    model.requires_grad_(False)
    table = model.unet.class_embedding.weight.requires_grad_(True)
    mask = torch.zeros_like(table)
    mask[model.null_label] = 1.0
    table.register_hook(lambda grad: grad * mask)
    return table


def with_null_row(teacher: EDMDenoiser) -> EDMDenoiser:
    """``teacher`` with one more class-embedding row, the null label, started at the mean of the class rows."""
    rows = int(teacher.unet.config.num_class_embeds)
    table = teacher.unet.class_embedding.weight.detach()
    grown = resize_class_table(teacher.unet, rows + 1, extra_row=table.mean(0))
    return EDMDenoiser(grown, teacher.sigma_data, null_label=rows).train(teacher.training)
