"""What both step paths (reference ``step.py``, fused ``fast_step.py``) draw and set per sub-step.

The noise levels and fake-score loss weights of ``config.schedule`` and the train/eval modes of
``config.train_dropout``: one definition, so the fused path cannot drift from the reference.
"""

from __future__ import annotations

import contextlib

import torch

from .config import SFDConfig
from .losses import (ddpm_sigma_table, ddpm_training_sigma, edm_loss_weight, edm_training_sigma,
                     eps_mse_loss_weight, sfd_sample_weights, sid_training_sigma)
from .state import SFDState


def _ddpm_sigmas(cfg: SFDConfig, device) -> torch.Tensor:
    return ddpm_sigma_table(cfg.ddpm_beta_start, cfg.ddpm_beta_end, cfg.ddpm_timesteps, device=device)


def fake_step_noise(cfg: SFDConfig, n: int, rng: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma (n,), per-sample loss weight (n,)) of the fake-score step under ``cfg.schedule``.

    "sid-edm" (SiD EDM code): ln sigma ~ N(p_mean, p_std^2), weight lambda(sigma) (EDM).
    "sfd-ddpm" (SFD DDPM code): integer t ~ U{ddpm_t_min..ddpm_t_max} on the linear-beta table,
    weight 1 / sigma^2, which makes the x0 loss the unweighted eps-MSE. Both times the SFD sample
    weights (group means, lambda_sg on forget samples, fake_loss_scale). Draws n values from ``rng``.
    """
    if cfg.schedule == "sfd-ddpm":
        sigma = ddpm_training_sigma(n, cfg.ddpm_t_min, cfg.ddpm_t_max, _ddpm_sigmas(cfg, device), generator=rng)
        weight = eps_mse_loss_weight(sigma)
    else:
        sigma = edm_training_sigma(n, cfg.p_mean, cfg.p_std, generator=rng, device=device)
        weight = edm_loss_weight(sigma, cfg.sigma_data)
    return sigma, weight * sfd_sample_weights(cfg.batch_size, cfg.forget_batch_size, cfg.lambda_sg,
                                              cfg.fake_loss_scale, device=device)


def generator_step_sigma(cfg: SFDConfig, n: int, rng: torch.Generator, device) -> torch.Tensor:
    """sigma (n,) of the generator step: SiD's t ~ U(0, t_max/1000) on the rho schedule ("sid-edm"),
    or the SFD DDPM code's integer t ~ U{ddpm_t_min..ddpm_t_max} on its linear betas ("sfd-ddpm")."""
    if cfg.schedule == "sfd-ddpm":
        return ddpm_training_sigma(n, cfg.ddpm_t_min, cfg.ddpm_t_max, _ddpm_sigmas(cfg, device), generator=rng)
    return sid_training_sigma(n, cfg.t_max, cfg.sigma_min, cfg.sigma_max, cfg.rho, generator=rng, device=device)


@contextlib.contextmanager
def dropout_modes(state: SFDState, training: str):
    """With ``config.train_dropout`` set, only the network being trained ("fake" or "gen") is in
    train mode, so only it drops out: in both reference codes G samples for the fake-score step
    in eval mode and the fake score scores for the generator step in eval mode. Without it the
    networks keep their modes (both train, as built by ``SFDState.create``)."""
    if not state.trains_with_dropout:
        yield
        return
    if any(getattr(m, "gradient_checkpointing", False) for net in (state.fake, state.generator) for m in net.modules()):
        # Recomputation in backward would draw new masks from the state's dropout generator
        # (torch.utils.checkpoint restores only torch's global RNG states).
        raise ValueError("train_dropout cannot be combined with gradient checkpointing of the fake score or G: "
                         "the recomputed forward would draw different dropout masks; set train_dropout=None "
                         "or turn gradient checkpointing off")
    state.fake.train(training == "fake")
    state.generator.train(training == "gen")
    try:
        yield
    finally:
        state.fake.train()
        state.generator.train()


__all__ = ["fake_step_noise", "generator_step_sigma", "dropout_modes"]
