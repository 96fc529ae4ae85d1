"""A DDPM noise schedule in EDM units: the sigma table of a scheduler and the sigma -> timestep lookup.

Every DDPM-style adapter (``networks.DDPMDenoiser`` over a pixel UNet, ``latent_denoiser.LatentDenoiser``
over an SD UNet) sees noise level sigma = sqrt((1 - abar_t) / abar_t) and feeds its UNet the
fractional timestep t(sigma), linear in log sigma between the table's entries. The lookup is written
once, here, as a compare-and-count: ``torch.searchsorted`` has no ONNX symbolic in either exporter
(TorchScript or dynamo), so a generator using it could not be exported.
"""

from __future__ import annotations

import torch


def log_sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log sigma_t (T,) float32 of a scheduler's ``alphas_cumprod`` (T,), computed in float64.

    Increasing in t (abar decreases), as the lookup below needs.
    """
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt().log().float()


def timestep_of_sigma(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional DDPM timestep (B,) in [0, T-1] whose noise level is sigma (B,).

    log sigma is clamped to the table's range, then interpolated linearly between the two table
    entries around it. ``(table < v).sum()`` is the number of entries below v, which for an
    increasing table is exactly ``torch.searchsorted(table, v)`` (side "left"): same numbers, but
    only Less / ReduceSum / Gather in ONNX.
    """
    table = log_sigmas
    log_sigma = sigma.to(table.dtype).log().clamp(table[0], table[-1])
    hi = (table < log_sigma[:, None]).sum(1).clamp(1, table.numel() - 1)
    lo_val, hi_val = table[hi - 1], table[hi]
    return (hi - 1).to(table.dtype) + (log_sigma - lo_val) / (hi_val - lo_val)


def sigma_of_timestep(scheduler_config: dict, t: int) -> float:
    """EDM sigma of DDPM timestep t: sqrt((1 - abar_t) / abar_t) (t_init=625 on SD's schedule ~ 2.5)."""
    from diffusers import DDPMScheduler

    abar = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()[t]
    return float(((1 - abar) / abar).sqrt())


__all__ = ["log_sigma_table", "timestep_of_sigma", "sigma_of_timestep"]
