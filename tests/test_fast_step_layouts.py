"""The fast path on multi-channel models (RGB, 4-channel latents) with channels_last, through the
Triton kernels (CPU: the interpreter), against the reference step.

The tiny test UNet has one channel, where NHWC and NCHW coincide: these models are the ones on
which the fused losses once refused channels_last UNet outputs (issue 14).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install sfd_fast[triton])")

from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet, train_step  # noqa: E402
from sfd_fast.core.step_options import STEP_PRESETS, StepOptions  # noqa: E402

CFG = SFDConfig(batch_size=4, forget_batch_size=2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def teacher(channels: int) -> EDMDenoiser:
    torch.manual_seed(0)
    config = UNetConfig(resolution=8, channels=channels, block_out_channels=(16, 32),
                        attention_levels=(False, True), attention_head_dim=16)
    return EDMDenoiser(build_unet(config)).eval()


def run(model, options, steps=2):
    state = SFDState.create(CFG, copy.deepcopy(model), device=DEVICE)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # psi off the teacher, as mid-training (else the G loss is rounding noise)
        for p in state.fake.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)
    metrics = [train_step(state, options=options) for _ in range(steps)]
    return state, metrics


def grads(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in module.parameters() if p.grad is not None])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("channels", [3, 4])
def test_channels_last_triton_fp32_equals_reference(channels):
    """fp32: only the summation order of convs and loss reductions differs (measured <= 1e-6)."""
    model = teacher(channels)
    ref, ref_m = run(model, None)
    fast, fast_m = run(model, StepOptions(fused=True, channels_last=True, backend="triton"))
    assert fast.generator.denoiser.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for r, f in zip(ref_m, fast_m):
        for key in r:
            torch.testing.assert_close(f[key].float(), r[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    assert rel_err(grads(fast.generator), grads(ref.generator)) < 1e-4
    assert rel_err(grads(fast.fake), grads(ref.fake)) < 1e-4


@pytest.mark.parametrize("channels", [3, 4])
def test_fast_preset_triton_within_bf16_tolerance(channels):
    """The fast preset (bf16, channels_last, shared noise; compile off) vs the reference step with
    the same shared noise, at the bf16 tolerance of test_fast_step.py (losses 2%, grads 10%)."""
    model = teacher(channels)
    ref, ref_m = run(model, StepOptions(share_noise=True), steps=1)
    fast, fast_m = run(model, STEP_PRESETS["fast"].replace(compile="off", backend="triton"), steps=1)
    for key in ("loss_fake", "loss_gen"):
        torch.testing.assert_close(fast_m[0][key], ref_m[0][key], rtol=2e-2, atol=0, msg=key)
    assert rel_err(grads(fast.fake), grads(ref.fake)) < 0.1
    assert rel_err(grads(fast.generator), grads(ref.generator)) < 0.1
    assert torch.nn.functional.cosine_similarity(grads(fast.generator), grads(ref.generator), dim=0) > 0.99
