"""One SFD iteration (SPEC sections 2-3): fake-score step, generator step, EMA.

Reference (eager) path. No ``.item()`` and no boolean indexing: bad samples are masked by
weights, and every metric comes back as a 0-d tensor for the caller to log when it wants.
"""

from __future__ import annotations

import torch

from . import dispatch, faults
from .ema import ema_beta, update_ema
from .forget import Conditions
from .grads import frozen, sanitize_grads
from .losses import edm_loss_weight, edm_training_sigma, sfd_sample_weights, sid_training_sigma
from .master_weights import full_precision_params
from .state import SFDState


def _noise(state: SFDState, n: int) -> torch.Tensor:
    return torch.randn((n, *state.image_shape), generator=state.rng, device=state.device)


def fake_score_step(state: SFDState, cond: Conditions, loss_fns: dispatch.LossFunctions,
                    z: torch.Tensor | None = None) -> dict:
    """Update psi with the EDM loss on detached generator samples (forget samples weighted lambda_sg).

    ``z`` (B, C, H, W): the generator's noise; drawn from ``state.rng`` when None.
    """
    cfg, n = state.config, cond.generator.shape[0]
    z = _noise(state, n) if z is None else z
    with torch.no_grad():
        x_g = state.generator(z, cond.generator)
    sigma = edm_training_sigma(n, cfg.p_mean, cfg.p_std, generator=state.rng, device=state.device)
    x_t = x_g + sigma.view(-1, 1, 1, 1) * _noise(state, n)
    denoised = state.fake(x_t, sigma, cond.fake_train)
    weight = edm_loss_weight(sigma, cfg.sigma_data) * sfd_sample_weights(
        cfg.batch_size, cfg.forget_batch_size, cfg.lambda_sg, cfg.fake_loss_scale, device=state.device)
    loss, per_sample = loss_fns.edm_denoising_loss(denoised, x_g, weight)
    state.opt_fake.zero_grad(set_to_none=True)
    loss.backward()
    update_ok = faults.check_finite(loss, state.fake.parameters(), faults.all_masked(per_sample))
    sanitize_grads(state.fake.parameters(), None)
    skipped = faults.guarded_step(state, "fake", state.opt_fake, update_ok)
    return {"loss_fake": loss.detach(), "nonfinite_fake": (~torch.isfinite(per_sample)).sum(), **skipped}


def generator_step(state: SFDState, cond: Conditions, loss_fns: dispatch.LossFunctions,
                   z: torch.Tensor | None = None) -> dict:
    """Update theta with the SiD loss; teacher sees override labels on forget samples (MU loss).

    ``z`` (B, C, H, W): the generator's noise; drawn from ``state.rng`` when None.
    """
    cfg, n = state.config, cond.generator.shape[0]
    x_g = state.generator(_noise(state, n) if z is None else z, cond.generator)
    sigma = sid_training_sigma(n, cfg.t_max, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                               generator=state.rng, device=state.device)
    x_t = x_g + sigma.view(-1, 1, 1, 1) * _noise(state, n)
    weight = sfd_sample_weights(cfg.batch_size, cfg.forget_batch_size, cfg.lambda_g, cfg.gen_loss_scale,
                                device=state.device)
    # Frozen through backward too: a gradient-checkpointed fake score recomputes its forward there.
    with frozen(state.fake):
        y_real = state.teacher(x_t, sigma, cond.teacher)
        y_fake = state.fake(x_t, sigma, cond.generator)
        loss, per_sample = loss_fns.sid_generator_loss(x_g, y_real, y_fake, weight, alpha=cfg.alpha,
                                                       omega_min=cfg.omega_min)
        state.opt_gen.zero_grad(set_to_none=True)
        loss.backward()
    update_ok = faults.check_finite(loss, state.generator.parameters(), faults.all_masked(per_sample))
    sanitize_grads(state.generator.parameters(), cfg.grad_clip_value)
    skipped = faults.guarded_step(state, "gen", state.opt_gen, update_ok)
    finite = torch.isfinite(per_sample)
    clean = torch.where(finite, per_sample, torch.zeros_like(per_sample)).detach()
    return {
        "loss_gen": loss.detach(),
        "loss_gen_remain": clean[:cfg.batch_size].mean(),
        "loss_gen_forget": clean[cfg.batch_size:].mean(),
        "nonfinite_gen": (~finite).sum(),
        **skipped,
    }


def train_step(state: SFDState, backend: str | None = None, options=None) -> dict[str, torch.Tensor]:
    """Run one full SFD iteration on ``state`` and return its metrics as 0-d tensors.

    Batch: ``batch_size`` remain samples then ``forget_batch_size`` forget samples, conditioned
    by ``state.forget.sample_conditions`` (G and the fake score see the forget condition; the
    teacher sees its override).

    ``options`` (``sfd_fast.StepOptions`` or a preset name, default: the reference path) picks
    how the step runs; ``options.fused`` selects the fast path of ``sfd_fast.core.fast_step``.
    ``backend``, when given, overrides ``options.backend``.
    """
    if options is not None:
        from .step_options import StepOptions

        options = StepOptions.from_name(options) if isinstance(options, str) else options
        if backend is not None:
            options = options.replace(backend=backend)
        if options.fused:
            from .fast_step import fast_train_step

            return fast_train_step(state, options)
        backend = options.backend
    share_noise = options is not None and options.share_noise
    cfg = state.config
    loss_fns = dispatch.resolve_backend(backend, state.device)
    cond = state.forget.sample_conditions(cfg.batch_size, cfg.forget_batch_size, state.rng, state.device)
    # share_noise: one z for both sub-steps (a change of sampling; see docs/fast_step.md).
    z = _noise(state, cond.generator.shape[0]) if share_noise else None
    metrics = fake_score_step(state, cond, loss_fns, z)
    metrics.update(generator_step(state, cond, loss_fns, z))
    batch_images = cfg.batch_size + cfg.forget_batch_size
    state.images_seen += batch_images
    state.step += 1
    update_ema(state.generator_ema, state.generator,
               ema_beta(cfg.ema_halflife_kimg, cfg.ema_rampup_ratio, state.images_seen, batch_images),
               full_precision_params(state.generator, state.opt_gen))
    return metrics
