"""schedule="sfd-ddpm": the SFD authors' DDPM code (tqch/score-forgetting-distillation, DDPM/
runners/diffusion.py and functions/losses.py) for both sub-steps, checked against independent
recomputations of its formulas: linear betas (diffusers' DDPMScheduler and the code's numpy
arithmetic), integer t ~ U{38..711}, and the unweighted eps-MSE fake loss and the SiD generator
loss written in the code's eps-prediction form.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sfd_fast import SFDConfig, SFDState, train_step
from sfd_fast.core.config import ddpm_sigma
from sfd_fast.core.losses import (ddpm_sigma_table, ddpm_training_sigma, edm_denoising_loss, eps_mse_loss_weight,
                                  sfd_sample_weights, sid_generator_loss)
from sfd_fast.core.substeps import fake_step_noise, generator_step_sigma
from sfd_fast.core.step_options import StepOptions
from sfd_fast.models.ddpm_schedule import log_sigma_table, timestep_of_sigma
from step_asserts import assert_fused_equals_reference

CFG = SFDConfig.from_name("sfd-ddpm").replace(batch_size=4, forget_batch_size=2)


def test_sigma_table_matches_diffusers_ddpm_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    abar = sched.alphas_cumprod.double()
    truth = ((1 - abar) / abar).sqrt()
    ours = ddpm_sigma_table(1e-4, 0.02, 1000).double()
    # diffusers builds fp32 betas with torch.linspace, the SFD code casts a float64 numpy linspace:
    # betas differ by <= 1 ulp and the fp32 cumulative product carries that (measured 1.1e-4 at t=0).
    torch.testing.assert_close(ours, truth, rtol=2e-4, atol=0)
    torch.testing.assert_close(ours[38:], truth[38:], rtol=2e-5, atol=0)  # the range SFD trains on


def test_sigma_table_is_the_sfd_codes_arithmetic():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64).astype(np.float32)  # get_beta_schedule, .float()
    exact = np.cumprod(1 - betas.astype(np.float64))  # the product of those fp32 betas
    ours = ddpm_sigma_table(1e-4, 0.02, 1000).double().numpy()
    np.testing.assert_allclose(ours, np.sqrt((1 - exact) / exact), rtol=1e-7)  # fp32 output rounding
    # The code's own fp32 (1 - b).cumprod(dim=0), here a sequential one: its rounding (measured
    # 4.3e-5 relative at t=4) is all that separates it from ours; on CUDA the scan rounds otherwise.
    fp32 = np.cumprod(1 - betas, dtype=np.float32).astype(np.float64)
    np.testing.assert_allclose(ours, np.sqrt((1 - fp32) / fp32), rtol=1e-4)
    np.testing.assert_allclose(ours[38:], np.sqrt((1 - fp32) / fp32)[38:], rtol=1e-5)
    # SPEC section 7: sigma 0.137-13.1 over t in {38..711}, sigma_init ~ 2.50 at t_init 440.
    assert ours[38] == pytest.approx(0.1373, abs=1e-4) and ours[711] == pytest.approx(13.01, abs=1e-2)
    assert ddpm_sigma(440) == pytest.approx(np.sqrt((1 - exact[440]) / exact[440]), rel=1e-7)


def test_training_t_is_uniform_on_38_to_711_inclusive():
    sigmas = ddpm_sigma_table(1e-4, 0.02, 1000)
    g = torch.Generator().manual_seed(0)
    sigma = ddpm_training_sigma(200_000, 38, 711, sigmas, generator=g)
    t = torch.searchsorted(sigmas, sigma)  # sigmas increase strictly: exact index of each draw
    assert torch.equal(sigmas[t], sigma)
    assert int(t.min()) == 38 and int(t.max()) == 711
    counts = torch.bincount(t, minlength=1000)[38:712].double()
    assert counts.min() > 0 and abs(t.double().mean().item() - (38 + 711) / 2) < 1.0
    assert counts.std().item() / counts.mean().item() < 0.1  # 674 bins of ~297: Poisson spread ~6%


def test_fake_loss_is_the_sfd_codes_eps_mse():
    """sid_sg_loss_conditional: x = x0 sqrt(a) + e sqrt(1-a), loss = sum_pixels (e - eps_hat)^2,
    batch mean; remain mean + 0.01 * forget mean. Ours: x0 loss of D with weight 1/sigma^2."""
    torch.manual_seed(0)
    n_r, n_f = 5, 3
    n = n_r + n_f
    b = torch.from_numpy(np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    abar_all = (1 - b).cumprod(0)
    t = torch.randint(38, 712, (n,))
    a = abar_all[t].view(-1, 1, 1, 1)
    x0, e, eps_hat = (torch.randn(n, 3, 4, 4, dtype=torch.float64) for _ in range(3))
    x_ddpm = x0 * a.sqrt() + e * (1 - a).sqrt()
    per = (e - eps_hat).square().sum(dim=(1, 2, 3))
    authors = per[:n_r].mean() * 1.0 + per[n_r:].mean() * 0.01
    # our x0 view of the same network output: D = (x_ddpm - sqrt(1-a) eps_hat) / sqrt(a)
    denoised = (x_ddpm - (1 - a).sqrt() * eps_hat) / a.sqrt()
    sigma = ((1 - a) / a).sqrt().flatten()
    weight = eps_mse_loss_weight(sigma) * sfd_sample_weights(n_r, n_f, 0.01, 1.0).double()
    ours, per_ours = edm_denoising_loss(denoised, x0, weight)
    torch.testing.assert_close(ours, authors, rtol=1e-7, atol=0)  # the sample weights 1/n are fp32
    torch.testing.assert_close(per_ours * eps_mse_loss_weight(sigma), per, rtol=1e-10, atol=0)
    assert eps_mse_loss_weight(sigma.float()).dtype == torch.float32  # fp32 at least, float64 kept


def test_generator_loss_is_the_sfd_codes_sid_g_loss():
    """sid_g_loss_conditional in eps form: p_x, sg_x from the eps predictions, omega from p_x."""
    torch.manual_seed(1)
    n = 6
    a = torch.rand(n, 1, 1, 1, dtype=torch.float64) * 0.9 + 0.05
    aa, bb = a.sqrt(), (1 - a).sqrt()
    x0, e, p_e, sg_e = (torch.randn(n, 3, 4, 4, dtype=torch.float64) for _ in range(4))
    x = x0 * aa + e * bb
    p_x, sg_x = (x - bb * p_e) / aa, (x - bb * sg_e) / aa
    omega = (p_x - x0).abs().mean(dim=[1, 2, 3], keepdim=True).clamp(min=1e-5)
    authors = ((p_x - sg_x) * ((p_x - x0) - 1.2 * (p_x - sg_x))).div(omega).sum(dim=(1, 2, 3)).mean()
    ours, _ = sid_generator_loss(x0, p_x, sg_x, torch.full((n,), 1.0 / n, dtype=torch.float64), alpha=1.2)
    torch.testing.assert_close(ours, authors, rtol=1e-10, atol=0)


def test_both_sub_steps_draw_sigma_from_the_ddpm_table():
    table = ddpm_sigma_table(1e-4, 0.02, 1000)
    allowed = table[38:712]
    g = torch.Generator().manual_seed(0)
    sigma_f, weight = fake_step_noise(CFG, 6, g, "cpu")
    sigma_g = generator_step_sigma(CFG, 6, g, "cpu")
    for sigma in (sigma_f, sigma_g):
        assert torch.isin(sigma, allowed).all()
    torch.testing.assert_close(weight, sfd_sample_weights(4, 2, 0.01, 1.0) / sigma_f.square(), rtol=1e-6, atol=0)
    # the EDM schedule is a different distribution: its draws are not table entries
    edm = SFDConfig(batch_size=4, forget_batch_size=2)
    assert not torch.isin(fake_step_noise(edm, 6, g, "cpu")[0], allowed).any()


def test_the_networks_see_only_ddpm_table_noise_levels(tiny_teacher):
    state = SFDState.create(CFG, copy.deepcopy(tiny_teacher))
    allowed = ddpm_sigma_table(1e-4, 0.02, 1000)[38:712]
    seen = []
    for name in ("teacher", "fake"):
        getattr(state, name).register_forward_hook(lambda m, args, out, name=name: seen.append((name, args[1])))
    train_step(state)
    assert [name for name, _ in seen] == ["fake", "teacher", "fake"]
    assert all(torch.isin(sigma.float(), allowed).all() for _, sigma in seen)


def test_a_ddpm_teacher_on_the_same_schedule_sees_integer_timesteps():
    """DDPMDenoiser maps sigma back to a timestep in its own table: on the same linear betas,
    sigma(t) returns t, so the teacher is queried as in the authors' code (integer t, t_init 440)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    log_sigmas = log_sigma_table(sched.alphas_cumprod)
    t = torch.arange(38, 712)
    back = timestep_of_sigma(ddpm_sigma_table(1e-4, 0.02, 1000)[t], log_sigmas)
    torch.testing.assert_close(back, t.float(), rtol=0, atol=2e-3)
    init = timestep_of_sigma(torch.tensor([CFG.sigma_init]), log_sigmas)
    assert init.item() == pytest.approx(440, abs=2e-3)


def test_fused_equals_reference_under_sfd_ddpm(tiny_teacher):
    """The whole sfd-ddpm preset (DDPM noise, eps-MSE, dropout 0.1, both clips, fixed EMA decay)."""
    ref, fast = assert_fused_equals_reference(CFG, tiny_teacher)
    start = SFDState.create(CFG, copy.deepcopy(tiny_teacher))
    assert any(not torch.equal(a, b) for a, b in zip(start.generator.parameters(), fast.generator.parameters()))


def test_sfd_ddpm_differs_from_sid_edm(tiny_teacher):
    """The schedule is really used: the same seed under the two schedules gives other losses."""
    edm = CFG.replace(schedule="sid-edm")
    a = train_step(SFDState.create(CFG, copy.deepcopy(tiny_teacher)))
    b = train_step(SFDState.create(edm, copy.deepcopy(tiny_teacher)))
    assert not torch.allclose(a["loss_fake"], b["loss_fake"]) and not torch.allclose(a["loss_gen"], b["loss_gen"])


@pytest.mark.parametrize("options", [None, StepOptions(fused=True)], ids=["reference", "fused"])
def test_sfd_ddpm_step_has_no_host_sync(tiny_teacher, options):
    """Table lookup by a device index, dropout masks, both clips and the fixed EMA decay stay on
    the device (the CPU proxy of tests/test_host_sync.py; fused Adam as on CUDA)."""
    from sfd_fast.core.host_sync import HostSyncDetector

    state = SFDState.create(CFG, copy.deepcopy(tiny_teacher), fused_adam=True)
    train_step(state, options=options)  # the first call builds the fused runtime
    with HostSyncDetector() as syncs:
        for _ in range(2):
            metrics = train_step(state, options=options)
    assert not syncs.found, syncs.report()
    assert all(torch.isfinite(v.float()) for v in metrics.values())
