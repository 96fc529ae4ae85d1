"""Robust SFD (beyond the papers): SFD whose forget term is also applied at adversarial conditions.

Each iteration is SFD's ``train_step`` followed by one *adversarial forget step*:
1. Inner attack (no evaluation classifier involved: that would train on the judge). For each forget
   sample, an offset delta (E,) to G's embedding of c_f is learned with Adam for ``inner_steps``
   so that the teacher explains G(z, e_f + delta) better with c_f than with the override c_o:
       min_delta  ||D_phi(x_t, s, c_f) - x_g||^2 - ||D_phi(x_t, s, c_o) - x_g||^2,  x_t = x_g + s eps,
   a two-class diffusion classifier (the teacher's denoising error is its evidence for a class).
2. The SFD forget terms at the adversarial condition: the fake score learns G's output there
   (EDM loss, weight lambda_sg) and G takes the score-based MU step (teacher at c_o, fake at the
   adversarial condition; weight lambda_g). Each network reads the condition as its own embedding
   row of c_f plus the shared delta, so G's gradient also reaches its table row.
The losses are the reference ``losses`` functions, unchanged.

Conditions are class labels (delta offsets each network's class-embedding row) or, on the
text-to-image path, text embeddings (B, L, D) (delta offsets the embedding every network reads,
so G's gradient stays in its weights): ``robust_sfd_step`` takes either state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.grads import frozen, sanitize_grads
from ..core.losses import (
    edm_denoising_loss,
    edm_loss_weight,
    edm_training_sigma,
    sid_generator_loss,
    sid_training_sigma,
)
from ..core.state import SFDState
from ..core.step import train_step


@dataclass(frozen=True)
class RobustConfig:
    """Budget of the inner attack and weight of the adversarial forget step."""

    inner_steps: int = 3            # Adam steps on delta per iteration
    inner_lr: float = 0.1           # Adam learning rate of delta (embedding units)
    weight: float = 1.0             # multiplies lambda_g / lambda_sg for the adversarial samples

    def __post_init__(self) -> None:
        if self.inner_steps < 1 or self.inner_lr <= 0 or self.weight < 0:
            raise ValueError(f"RobustConfig needs inner_steps >= 1, inner_lr > 0, weight >= 0; got {self}")


def _embed(module, c: torch.Tensor) -> torch.Tensor:
    """The embedding ``module`` reads for condition c: its class-embedding rows of labels c, or c
    itself when c is already an embedding (text-to-image)."""
    if c.is_floating_point():
        return c
    denoiser = getattr(module, "denoiser", module)
    return denoiser.unet.class_embedding.weight[c]


def _noise(state: SFDState, n: int) -> torch.Tensor:
    return torch.randn((n, *state.image_shape), generator=state.rng, device=state.device)


def inner_attack(state: SFDState, labels_f: torch.Tensor, labels_o: torch.Tensor, z: torch.Tensor,
                 rcfg: RobustConfig) -> torch.Tensor:
    """Per-sample offsets delta (B_f, E) (or (B_f, L, D) for text) that pull G(z, e_f + delta) back
    towards c_f (teacher's view). labels_f, labels_o: labels (B_f,) or text embeddings (B_f, L, D)."""
    cfg, n = state.config, len(labels_f)
    base = _embed(state.generator, labels_f).detach()
    delta = torch.zeros_like(base, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=rcfg.inner_lr)
    for _ in range(rcfg.inner_steps):
        x_g = state.generator(z, base + delta)
        sigma = edm_training_sigma(n, cfg.p_mean, cfg.p_std, generator=state.rng, device=state.device)
        x_t = x_g + sigma.view(-1, 1, 1, 1) * _noise(state, n)
        err_f = (state.teacher(x_t, sigma, labels_f) - x_g).square().flatten(1).sum(1)
        err_o = (state.teacher(x_t, sigma, labels_o) - x_g).square().flatten(1).sum(1)
        loss = (err_f - err_o).sum()
        (delta.grad,) = torch.autograd.grad(loss, delta)  # G's weights get no gradient here
        opt.step()
    return delta.detach()


def adversarial_forget_step(state: SFDState, rcfg: RobustConfig) -> dict[str, torch.Tensor]:
    """Inner attack, then the fake-score and generator forget terms at the adversarial conditions."""
    cfg, n = state.config, state.config.forget_batch_size
    cond = state.forget.sample_conditions(0, n, state.rng, state.device)  # forget samples only
    labels_f, labels_o = cond.generator, cond.teacher
    z = _noise(state, n)
    delta = inner_attack(state, labels_f, labels_o, z, rcfg)
    cond_fake = (_embed(state.fake, labels_f) + delta).detach()

    # Fake score: learn G's distribution at the adversarial condition.
    with torch.no_grad():
        x_adv = state.generator(z, _embed(state.generator, labels_f) + delta)
    sigma = edm_training_sigma(n, cfg.p_mean, cfg.p_std, generator=state.rng, device=state.device)
    x_t = x_adv + sigma.view(-1, 1, 1, 1) * _noise(state, n)
    weight = edm_loss_weight(sigma, cfg.sigma_data) * (cfg.fake_loss_scale * cfg.lambda_sg * rcfg.weight / n)
    loss_fake, _ = edm_denoising_loss(state.fake(x_t, sigma, cond_fake), x_adv, weight)
    state.opt_fake.zero_grad(set_to_none=True)
    loss_fake.backward()
    sanitize_grads(state.fake.parameters(), None)
    state.opt_fake.step()

    # Generator: score-based MU loss, teacher at the override label, fake at the adversarial condition.
    x_g = state.generator(z, _embed(state.generator, labels_f) + delta)
    sigma = sid_training_sigma(n, cfg.t_max, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                               generator=state.rng, device=state.device)
    x_t = x_g + sigma.view(-1, 1, 1, 1) * _noise(state, n)
    weight = torch.full((n,), cfg.gen_loss_scale * cfg.lambda_g * rcfg.weight / n, device=state.device)
    with frozen(state.fake):  # through backward too (a checkpointed fake score recomputes there)
        y_real = state.teacher(x_t, sigma, labels_o)
        y_fake = state.fake(x_t, sigma, cond_fake)
        loss_gen, _ = sid_generator_loss(x_g, y_real, y_fake, weight, alpha=cfg.alpha, omega_min=cfg.omega_min)
        state.opt_gen.zero_grad(set_to_none=True)
        loss_gen.backward()
    sanitize_grads(state.generator.parameters(), cfg.grad_clip_value)
    state.opt_gen.step()
    return {"loss_fake_adv": loss_fake.detach(), "loss_gen_adv": loss_gen.detach(),
            "delta_norm": delta.flatten(1).norm(dim=1).mean()}


def robust_sfd_step(state: SFDState, rcfg: RobustConfig = RobustConfig(), backend: str | None = None,
                    options=None) -> dict:
    """One robust SFD iteration: ``train_step`` (with ``backend``/``options``) then
    ``adversarial_forget_step``; metrics as 0-d tensors."""
    metrics = train_step(state, backend, options)
    metrics.update(adversarial_forget_step(state, rcfg))
    return metrics


__all__ = ["RobustConfig", "inner_attack", "adversarial_forget_step", "robust_sfd_step"]
