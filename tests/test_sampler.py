"""EDM Heun sampler: NFE count and an exact answer on a point-mass data distribution."""

import torch
from torch import nn

from sfd_fast.models.sampler import edm_heun_sample, edm_sigma_steps, heun_nfe


class PointMassDenoiser(nn.Module):
    """The ideal denoiser of a data distribution concentrated on one image x0: D(x, sigma) = x0."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.calls = x0, 0

    def forward(self, x, sigma, c):
        self.calls += 1
        return self.x0.expand_as(x)


def test_heun_reaches_the_point_mass_and_counts_nfe():
    x0 = torch.randn(1, 1, 4, 4)
    d = PointMassDenoiser(x0)
    out = edm_heun_sample(d, torch.randn(3, 1, 4, 4), torch.zeros(3, dtype=torch.long), num_steps=18)
    torch.testing.assert_close(out, x0.expand(3, -1, -1, -1), rtol=0, atol=1e-5)
    assert d.calls == heun_nfe(18) == 35


def test_sigma_steps_endpoints():
    s = edm_sigma_steps(18)
    assert abs(s[0].item() - 80) < 1e-9 and abs(s[-2].item() - 0.002) < 1e-12 and s[-1] == 0
