"""Shared test fixtures: tiny real diffusers models, fixed seeds."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU (CI): Triton kernels run in its interpreter. Must be set before anything imports
    # triton, so here rather than in the kernel tests (torch.compile tests may import it first).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sfd_fast import EDMDenoiser, UNetConfig, build_unet


@pytest.fixture
def tiny_teacher() -> EDMDenoiser:
    torch.manual_seed(0)
    return EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).eval()



@pytest.fixture(scope="session")
def tiny_onnx_generator(tmp_path_factory):
    """(generator, path of its TorchScript-exported .onnx): the serving tests' model, exported once."""
    from sfd_fast.models.networks import OneStepGenerator
    from sfd_fast.serve import to_onnx

    torch.manual_seed(0)
    g = OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name("tiny")))).eval()
    path = tmp_path_factory.mktemp("onnx") / "g.onnx"
    to_onnx(g, path, exporter="torchscript")
    return g, path
