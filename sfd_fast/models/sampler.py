"""EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) for the teacher."""

from __future__ import annotations

import torch
from torch import nn


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """num_steps noise levels from sigma_max down to sigma_min, then a final 0. Shape (N+1,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    steps = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho
    return torch.cat([steps, torch.zeros(1, dtype=torch.float64, device=device)])


def heun_nfe(num_steps: int) -> int:
    """Network evaluations of the Heun sampler: two per step, one for the last (Euler) step."""
    return 2 * num_steps - 1


def heun_sample(denoiser: nn.Module, z: torch.Tensor, c: torch.Tensor, num_steps: int = 18,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Differentiable Heun sampler: x0 from z ~ N(0, I) (B, C, H, W), c labels (B,) or embeddings (B, E).

    Uses heun_nfe(num_steps) NFE. Gradients flow to z, c and the denoiser (conditioning-space attacks).
    """
    sigmas = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=z.device)
    x = z.double() * sigmas[0]
    for i in range(num_steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d_cur = (x - denoiser(x.float(), s_cur.float().expand(x.shape[0]), c).double()) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if i < num_steps - 1:
            d_next = (x_next - denoiser(x_next.float(), s_next.float().expand(x.shape[0]), c).double()) / s_next
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.float()


@torch.no_grad()
def edm_heun_sample(denoiser: nn.Module, z: torch.Tensor, c: torch.Tensor, num_steps: int = 18,
                    sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Sample x0 from noise z ~ N(0, I) (B, C, H, W) with labels c; uses heun_nfe(num_steps) NFE."""
    return heun_sample(denoiser, z, c, num_steps, sigma_min, sigma_max, rho)


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): D_null + w (D(c) - D_null), one call of 2B samples.

    Needs a teacher trained with label dropout (``denoiser.null_label``); w = 1 is the conditional
    teacher, w > 1 trades diversity for class fidelity. Any sampler above takes it as its denoiser.
    """

    def __init__(self, denoiser: nn.Module, scale: float):
        super().__init__()
        if getattr(denoiser, "null_label", None) is None:
            raise ValueError("classifier-free guidance needs a teacher with a null label: pretrain it with "
                             "`sfd-fast pretrain-teacher --label-dropout 0.1`")
        self.denoiser, self.scale = denoiser, float(scale)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        null = torch.full_like(c, self.denoiser.null_label)
        d_c, d_null = self.denoiser(x.repeat(2, 1, 1, 1), sigma.repeat(2), torch.cat([c, null])).chunk(2)
        return d_null + self.scale * (d_c - d_null)
