"""Reference losses against independent hand-expanded formulas (SPEC section 2)."""

import math

import numpy as np
import pytest
import torch

from sfd_fast import EDMDenoiser, UNetConfig, build_unet
from sfd_fast.core.losses import (
    edm_denoising_loss,
    edm_loss_weight,
    sfd_sample_weights,
    sid_generator_loss,
    sid_training_sigma,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sid_loss_matches_expanded_formula():
    # SPEC: L = [(1 - alpha)||y_r - y_f||^2 + (y_r - y_f)^T (y_f - x_g)] / omega, per sample, in numpy.
    x, yr, yf = _rand(5, 2, 3, 3, seed=1), _rand(5, 2, 3, 3, seed=2), _rand(5, 2, 3, 3, seed=3)
    w = torch.rand(5, dtype=torch.float64)
    alpha = 1.2
    total, per = sid_generator_loss(x, yr, yf, w, alpha=alpha)
    xn, rn, fn = (t.numpy().reshape(5, -1) for t in (x, yr, yf))
    d = rn - fn
    omega = np.maximum(np.abs(xn - rn).mean(1), 1e-5)
    expected = ((1 - alpha) * (d * d).sum(1) + (d * (fn - xn)).sum(1)) / omega
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(total.item(), (w.numpy() * expected).sum(), rtol=1e-5)


def test_sid_omega_is_clipped_and_constant():
    x = _rand(2, 1, 4, 4)
    _, per = sid_generator_loss(x, x.clone(), x + 1, torch.ones(2), alpha=1.2, omega_min=1e-5)
    # y_r == x_g: omega hits its floor 1e-5; d = -1 and y_f - x_g = 1 on all 16 pixels.
    np.testing.assert_allclose(per.numpy(), [((1 - 1.2) * 16 - 16) / 1e-5] * 2, rtol=1e-5)


def test_sid_gradient_through_teacher_and_fake_inputs():
    """Autograd of the full chain equals the hand-derived gradient pushed through each network's VJP."""
    torch.manual_seed(0)
    teacher = EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).double().eval().requires_grad_(False)
    fake = EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).double().eval().requires_grad_(False)
    alpha, n = 1.2, 3
    x_g = _rand(n, 1, 8, 8, seed=4).requires_grad_(True)
    sigma = torch.tensor([0.3, 1.0, 5.0], dtype=torch.float64)
    noise = _rand(n, 1, 8, 8, seed=5)
    c_r, c_f = torch.tensor([1, 2, 1]), torch.tensor([0, 2, 0])  # override label for the teacher
    w = torch.tensor([0.5, 0.5, 2.0], dtype=torch.float64)

    x_t = x_g + sigma.view(-1, 1, 1, 1) * noise
    y_r, y_f = teacher(x_t, sigma, c_r), fake(x_t, sigma, c_f)
    total, _ = sid_generator_loss(x_g, y_r, y_f, w, alpha=alpha)
    (grad_autograd,) = torch.autograd.grad(total, x_g)

    with torch.no_grad():
        d = y_r - y_f
        omega = (x_g - y_r).abs().flatten(1).mean(1).clamp_min(1e-5)
        scale = (w / omega).view(-1, 1, 1, 1)
        g_x = -scale * d
        g_r = scale * ((y_r - x_g) + (1 - 2 * alpha) * d)
        g_f = scale * (-(y_r - x_g) + 2 * alpha * d)
    xt = x_t.detach().requires_grad_(True)
    (vjp_r,) = torch.autograd.grad(teacher(xt, sigma, c_r), xt, g_r)
    xt = x_t.detach().requires_grad_(True)
    (vjp_f,) = torch.autograd.grad(fake(xt, sigma, c_f), xt, g_f)
    torch.testing.assert_close(grad_autograd, g_x + vjp_r + vjp_f, rtol=1e-9, atol=1e-9)


def test_edm_loss_matches_formula():
    d, x = _rand(4, 1, 3, 3, seed=6), _rand(4, 1, 3, 3, seed=7)
    sigma = torch.tensor([0.1, 0.5, 1.0, 10.0], dtype=torch.float64)
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(edm_loss_weight(sigma, 0.5), lam.float())
    total, per = edm_denoising_loss(d, x, lam)
    expected = ((d - x) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(per, expected)
    torch.testing.assert_close(total, (lam * expected).sum())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_samples_are_masked(bad):
    x, yr, yf = _rand(4, 1, 4, 4, seed=8).float(), _rand(4, 1, 4, 4, seed=9).float(), _rand(4, 1, 4, 4, seed=10).float()
    yr[2, 0, 1, 1] = bad
    w = torch.ones(4)
    total, per = sid_generator_loss(x, yr, yf, w, alpha=1.2)
    assert not torch.isfinite(per[2]) and torch.isfinite(per[[0, 1, 3]]).all()
    torch.testing.assert_close(total, per[[0, 1, 3]].sum())
    total_edm, per_edm = edm_denoising_loss(yr, x, w)
    torch.testing.assert_close(total_edm, per_edm[[0, 1, 3]].sum())


def test_sfd_weights_normalise_each_group():
    w = sfd_sample_weights(4, 2, lam=0.5, scale=100.0)
    torch.testing.assert_close(w, torch.tensor([25.0] * 4 + [25.0] * 2))
    assert math.isclose(w[:4].sum().item(), 100.0) and math.isclose(w[4:].sum().item(), 50.0)


def test_sid_sigma_range():
    s = sid_training_sigma(10000, 800, 0.002, 80, 7, generator=torch.Generator().manual_seed(0))
    assert s.min() >= 0.002 and s.max() <= 24.5 and s.max() > 20  # sigma(0.8) ~ 24.4 (SPEC)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        sid_generator_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4, 4),
                           torch.ones(2), alpha=1.2)
    with pytest.raises(ValueError, match="non-empty"):
        edm_denoising_loss(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4), torch.ones(0))
