"""Shared test fixtures: tiny real diffusers models, fixed seeds."""

from __future__ import annotations

import pytest
import torch

from sfd_fast import EDMDenoiser, UNetConfig, build_unet


@pytest.fixture
def tiny_teacher() -> EDMDenoiser:
    torch.manual_seed(0)
    return EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).eval()
