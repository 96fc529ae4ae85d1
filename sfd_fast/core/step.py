"""One SFD iteration (SPEC sections 2-3): fake-score step, generator step, EMA.

Reference (eager) path. No ``.item()`` and no boolean indexing: bad samples are masked by
weights, and every metric comes back as a 0-d tensor for the caller to log when it wants.
"""

from __future__ import annotations


import torch

from . import dispatch, faults
from .config import SFDConfig
from .ema import ema_beta, update_ema
from .forget import Conditions
from .grads import frozen, sanitize_grads
from .lora import teacher_and_fake, update_merged_ema
from .losses import sfd_sample_weights
from .master_weights import full_precision_params
from .state import SFDState
from .substeps import dropout_modes, fake_step_noise, generator_step_sigma


def _noise(state: SFDState, n: int) -> torch.Tensor:
    return torch.randn((n, *state.image_shape), generator=state.rng, device=state.device)


def fake_score_step(state: SFDState, cond: Conditions, loss_fns: dispatch.LossFunctions,
                    z: torch.Tensor | None = None) -> dict:
    """Update psi with the EDM loss on detached generator samples (forget samples weighted lambda_sg).

    ``z`` (B, C, H, W): the generator's noise; drawn from ``state.rng`` when None.
    """
    cfg, n = state.config, cond.generator.shape[0]
    z = _noise(state, n) if z is None else z
    with dropout_modes(state, "fake"):
        with torch.no_grad():
            x_g = state.generator(z, cond.generator)
        sigma, weight = fake_step_noise(cfg, n, state.rng, state.device)
        x_t = x_g + sigma.view(-1, 1, 1, 1) * _noise(state, n)
        denoised = state.fake(x_t, sigma, cond.fake_train)
    loss, per_sample = loss_fns.edm_denoising_loss(denoised, x_g, weight)
    state.opt_fake.zero_grad(set_to_none=True)
    loss.backward()
    update_ok = faults.check_finite(loss, state.fake.parameters(), faults.all_masked(per_sample))
    sanitize_grads(state.fake.parameters(), cfg.fake_grad_clip_value)
    skipped = faults.guarded_step(state, "fake", state.opt_fake, update_ok)
    return {"loss_fake": loss.detach(), "nonfinite_fake": (~torch.isfinite(per_sample)).sum(), **skipped}


def generator_step(state: SFDState, cond: Conditions, loss_fns: dispatch.LossFunctions,
                   z: torch.Tensor | None = None) -> dict:
    """Update theta with the SiD loss; teacher sees override labels on forget samples (MU loss).

    ``z`` (B, C, H, W): the generator's noise; drawn from ``state.rng`` when None.
    """
    cfg, n = state.config, cond.generator.shape[0]
    with dropout_modes(state, "gen"):
        return _generator_update(state, cond, loss_fns, z, cfg, n)


def _generator_update(state: SFDState, cond: Conditions, loss_fns: dispatch.LossFunctions,
                      z: torch.Tensor | None, cfg: SFDConfig, n: int) -> dict:
    x_g = state.generator(_noise(state, n) if z is None else z, cond.generator)
    sigma = generator_step_sigma(cfg, n, state.rng, state.device)
    x_t = x_g + sigma.view(-1, 1, 1, 1) * _noise(state, n)
    weight = sfd_sample_weights(cfg.batch_size, cfg.forget_batch_size, cfg.lambda_g, cfg.gen_loss_scale,
                                device=state.device)
    # Frozen through backward too: a gradient-checkpointed fake score recomputes its forward there.
    with frozen(state.fake):
        if state.lora is not None and state.lora.fused:
            # LoRA mode: teacher and fake score share their base weights, so both run as ONE call
            # of 2B rows (teacher rows without the adapter); core/lora.py, docs/lora.md.
            y_real, y_fake = teacher_and_fake(state.fake, x_t, sigma, cond.teacher, cond.generator)
        else:
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

            _check_lora_fast_path(state)

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
    beta = ema_beta(cfg.ema_halflife_kimg, cfg.ema_rampup_ratio, state.images_seen, batch_images, cfg.ema_decay)
    if state.lora is not None and state.lora.generator:
        update_merged_ema(state.generator_ema, state.generator, beta)  # the EMA of G's merged weights
    else:
        update_ema(state.generator_ema, state.generator, beta, full_precision_params(state.generator, state.opt_gen))
    return metrics


def _check_lora_fast_path(state: SFDState) -> None:
    """The fused path runs a LoRA fake score as two B calls (correct, not fused); a LoRA G it cannot run."""
    if state.lora is not None and state.lora.generator:
        raise ValueError("the fused step (StepOptions.fused=True) does not support a LoRA generator "
                         "(LoRAConfig(generator=True)): its EMA pairs G's and the EMA's parameters one to one, "
                         "while a LoRA G's EMA averages its merged weights; use the reference step options "
                         "(StepOptions(fused=False) or options=None) for now")
