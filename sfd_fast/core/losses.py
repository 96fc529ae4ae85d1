"""Reference losses of SiD/SFD in plain PyTorch: the single source of truth for the math.

Fused kernels (``sfd_fast.kernels``, ``sfd_fast._C``) must match these functions; the training
step reaches them only through ``sfd_fast.core.dispatch``. All arithmetic is fp32 whatever the input
dtype (float64 stays float64). Shapes: images are (B, C, H, W); per-sample tensors are (B,).

Both losses return ``(total, per_sample)``:
- ``per_sample`` is the unweighted loss of each sample (NaN/inf where that sample is bad);
- ``total = sum_i weight_i * per_sample_i`` over the samples whose loss is finite. Bad samples
  are masked with ``torch.where`` rather than boolean indexing (the reference code's
  ``loss[~nan_mask]``), which gives the same value with no host sync and static shapes.
  ``weight`` carries the loss scale, the 1/batch normalisation and the SFD lambdas.
- A masked sample gets exactly zero gradient in every input, as in the fused kernels. Masking
  only the total is not enough: its zero upstream gradient meets the sample's NaN/inf
  partials (0 * inf = NaN) and one bad row would poison the whole update. So each loss first
  finds the bad rows without autograd, then differentiates through inputs whose bad rows are
  replaced by zeros (``torch.where``'s backward sends those rows exactly 0).
"""

from __future__ import annotations

import torch


def edm_training_sigma(n: int, p_mean: float, p_std: float, *, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """ln(sigma) ~ N(p_mean, p_std^2), shape (n,): the EDM training noise distribution."""
    return (torch.randn(n, generator=generator, device=device) * p_std + p_mean).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    sigma = sigma.float()
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sid_training_sigma(n: int, t_max: float, sigma_min: float, sigma_max: float, rho: float, *,
                       generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ U(0, t_max/1000); sigma(t) on EDM's rho schedule (sigma(0) = sigma_min). Shape (n,)."""
    t = torch.rand(n, generator=generator, device=device) * (t_max / 1000)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1 - t) * (lo - hi)) ** rho


def ddpm_sigma_table(beta_start: float, beta_end: float, timesteps: int, *,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) (timesteps,) float32 of a linear-beta DDPM, t = 0..T-1.

    Betas as in the SFD DDPM code (``runners/diffusion.py``): a float64 linspace cast to float32.
    Its abar is a float32 ``cumprod``, whose rounding depends on the device's scan order (CPU and
    CUDA differ by up to ~4e-5 relative at small t); here the product of those float32 betas is
    taken in float64, the device-independent value they all approximate. sigma is the EDM noise
    level of the same x_t: x_edm = x_ddpm / sqrt(abar_t) = x0 + sigma_t * eps. Built on ``device``
    (no host-to-device copy, so it can be called while a CUDA graph is captured).
    """
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64, device=device).float()
    abar = (1 - betas.double()).cumprod(0)
    return ((1 - abar) / abar).sqrt().float()


def ddpm_training_sigma(n: int, t_min: int, t_max: int, sigmas: torch.Tensor, *,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer t ~ U{t_min..t_max} (both included), sigma = sigmas[t]. Shape (n,), on sigmas' device.

    The SFD DDPM code's ``torch.randint(low=t_min, high=t_max + 1)`` for both sub-steps.
    """
    t = torch.randint(t_min, t_max + 1, (n,), generator=generator, device=sigmas.device)
    return sigmas.index_select(0, t)


def eps_mse_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """1 / sigma^2: the weight that turns the x0 loss sum_pixels (D - x0)^2 into the eps-MSE.

    With x_t = x0 + sigma eps and eps_hat = (x_t - D) / sigma: eps_hat - eps = (x0 - D) / sigma,
    so sum_pixels (eps_hat - eps)^2 = sum_pixels (D - x0)^2 / sigma^2 (the SFD DDPM code's
    ``sid_sg_loss_conditional``: per-sample sum over pixels, then a batch mean).
    """
    return _upcast(sigma).square().reciprocal()


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16/fp32 -> fp32 (float64 stays float64, for gradient checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def masked_weighted_sum(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_i weight_i * per_sample_i over finite samples (no host sync, no boolean indexing)."""
    finite = torch.isfinite(per_sample)
    return torch.where(finite, per_sample * weight.to(per_sample.dtype), torch.zeros_like(per_sample)).sum()


def _with_masked_rows(per_sample_fn, weight: torch.Tensor, *inputs: torch.Tensor):
    """(total, per_sample) of ``per_sample_fn(*inputs)``, bad rows masked in value and gradient.

    per_sample keeps the NaN/inf of bad rows (callers count them); on good rows it and every
    gradient are bit-identical to differentiating ``per_sample_fn`` directly.
    """
    with torch.no_grad():
        raw = per_sample_fn(*inputs)
    good = torch.isfinite(raw)
    rows = good.view(-1, *([1] * (inputs[0].dim() - 1)))
    gated = [torch.where(rows, t, torch.zeros_like(t)) for t in inputs]
    per_sample = torch.where(good, per_sample_fn(*gated), raw)
    return masked_weighted_sum(per_sample, weight), per_sample


def _edm_per_sample(denoised: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (_upcast(denoised) - _upcast(target)).square().flatten(1).sum(1)


def edm_denoising_loss(denoised: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM loss: per_sample_i = sum_pixels (D_i - x_i)^2; total = sum_i weight_i per_sample_i.

    weight (B,) = lambda(sigma_i) * sample weight (scale / batch, SFD's lambda_sg for forget
    samples). Used for teacher pretraining and the fake-score step.
    """
    _check_same(denoised, target, "denoised", "target")
    return _with_masked_rows(_edm_per_sample, weight, denoised, target)


def sid_omega(x_g: torch.Tensor, y_real: torch.Tensor, omega_min: float) -> torch.Tensor:
    """omega_i = stopgrad(mean_pixels |x_g - y_real|) clipped below at omega_min. Shape (B,)."""
    with torch.no_grad():
        return (_upcast(x_g) - _upcast(y_real)).abs().flatten(1).mean(1).clamp_min(omega_min)


def sid_generator_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor,
                       weight: torch.Tensor, *, alpha: float,
                       omega_min: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """SiD generator loss (SPEC section 2), per sample:

        L_i = sum_pixels (y_r - y_f) * ((y_r - x_g) - alpha (y_r - y_f)) / omega_i

    with y_r the teacher's and y_f the fake score's denoised estimates at x_t = x_g + sigma eps.
    Gradients flow into x_g directly and through y_r, y_f (into the networks' inputs); omega is
    a constant. SFD's score-based unlearning term is this same loss with the teacher evaluated
    at the override label, weighted by lambda_g through ``weight``.
    """
    _check_same(x_g, y_real, "x_g", "y_real")
    _check_same(x_g, y_fake, "x_g", "y_fake")

    def per_sample_fn(x_g, y_real, y_fake):
        x_g, y_real, y_fake = _upcast(x_g), _upcast(y_real), _upcast(y_fake)
        omega = sid_omega(x_g, y_real, omega_min)
        diff = y_real - y_fake
        return (diff * ((y_real - x_g) - alpha * diff)).flatten(1).sum(1) / omega

    return _with_masked_rows(per_sample_fn, weight, x_g, y_real, y_fake)


def sfd_sample_weights(n_remain: int, n_forget: int, lam: float, scale: float, *,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample weights of ``L = scale * (mean_remain L_i + lam * mean_forget L_i)``.

    Samples are stacked remain first, then forget. Each group is normalised by its own size, so
    the SFD objective "L(remain) + lambda * L(forget)" keeps the reference's per-batch scale.
    """
    return torch.cat([torch.full((n_remain,), scale / n_remain, device=device),
                      torch.full((n_forget,), scale * lam / n_forget, device=device)])


def _check_same(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}; "
                         "they must be equal")
    if a.dim() < 2 or a.shape[0] == 0:
        raise ValueError(f"{name_a} must be a non-empty batch (B, ...) with B >= 1, got shape {tuple(a.shape)}")


__all__ = [
    "edm_training_sigma", "edm_loss_weight", "sid_training_sigma", "ddpm_sigma_table", "ddpm_training_sigma",
    "eps_mse_loss_weight", "masked_weighted_sum",
    "edm_denoising_loss", "sid_omega", "sid_generator_loss", "sfd_sample_weights",
]
