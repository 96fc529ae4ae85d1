"""No host sync inside train_step: HostSyncDetector over the reference, fused and fast presets.

CPU proxy for the GPU (see sfd_fast/core/host_sync.py for what it can and cannot see). States
are built as on CUDA (fused Adam, whose step counters live on the device); compile is off
(dynamo traces instead of dispatching, so the mode would see the compiled graph's ops only).
"""

from __future__ import annotations

import copy

import pytest
import torch

from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet, train_step
from sfd_fast.core.host_sync import HostSyncDetector
from sfd_fast.core.step_options import STEP_PRESETS

CFG = SFDConfig(batch_size=4, forget_batch_size=2)
PRESETS = {
    "reference": STEP_PRESETS["reference"],
    "fused": STEP_PRESETS["fused"],
    "bf16": STEP_PRESETS["bf16"],
    "fast": STEP_PRESETS["fast"].replace(compile="off"),
}


def rgb_teacher() -> EDMDenoiser:
    torch.manual_seed(0)
    config = UNetConfig(resolution=8, channels=3, block_out_channels=(16, 32), attention_levels=(False, True),
                        attention_head_dim=16)
    return EDMDenoiser(build_unet(config)).eval()


def test_detector_sees_each_kind_of_sync():
    """The detector can fail: every known way of reading device memory on the host is recorded."""
    x = torch.randn(4, 3)
    mask = x > 0
    cases = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "python branch": lambda: 1 if x.max() > 10 else 0,
        "boolean index": lambda: x[mask],
        "nonzero": lambda: torch.nonzero(mask),
        "one-argument where": lambda: torch.where(mask),
        "masked_select": lambda: x.masked_select(mask),
        "unique": lambda: torch.unique(x),
        # The EMA bug of issue 14: a 0-d tensor as foreach lerp's scalar weight is read on the host.
        "foreach lerp with tensor weight": lambda: torch._foreach_lerp_([x.clone()], [x], torch.tensor(0.5)),
    }
    for name, fn in cases.items():
        with HostSyncDetector() as syncs:
            fn()
        assert syncs.found, f"{name}: not detected"
        assert "test_host_sync.py" in syncs.found[0].where, syncs.report()
    with HostSyncDetector() as syncs:  # sync-free counterparts
        torch.where(mask, x, 0.0).sum()
        x.masked_fill(mask, 0.0)
        x[torch.tensor([0, 2])]
        torch._foreach_lerp_([x.clone()], [x], 0.5)
    assert not syncs.found, syncs.report()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_train_step_has_no_host_sync(preset):
    state = SFDState.create(CFG, rgb_teacher(), fused_adam=True)
    options = PRESETS[preset]
    train_step(state, options=options)  # first call builds the runtime (layouts, processors)
    with HostSyncDetector() as syncs:
        for _ in range(2):
            metrics = train_step(state, options=options)
    assert not syncs.found, f"{preset}: {syncs.report()}"
    assert all(torch.isfinite(v.float()) for v in metrics.values())


def test_skipped_update_has_no_host_sync():
    """The non-finite guard's skip path (fused Adam's found_inf) stays on the device too."""
    state = SFDState.create(CFG, rgb_teacher(), fused_adam=True)
    train_step(state, options="fused")
    gen_before = copy.deepcopy(state.generator.state_dict())
    param = next(state.generator.parameters())
    handle = param.register_hook(lambda grad: grad * float("nan"))  # a NaN gradient in G's update
    with HostSyncDetector() as syncs:
        metrics = train_step(state, options="fused")
    handle.remove()
    assert not syncs.found, syncs.report()
    assert int(metrics["skipped_gen"]) == 1
    for key, value in state.generator.state_dict().items():
        assert torch.equal(value, gen_before[key]), key


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("preset", list(PRESETS))
def test_cuda_train_step_has_no_host_sync(preset):
    """On the GPU the detector also sees blocking device-to-host copies; default optimizers (fused Adam)."""
    state = SFDState.create(CFG, rgb_teacher(), device="cuda")
    train_step(state, options=PRESETS[preset])
    with HostSyncDetector(device="cuda") as syncs:
        for _ in range(2):
            train_step(state, options=PRESETS[preset])
    assert not syncs.found, f"{preset}: {syncs.report()}"


@needs_cuda
@pytest.mark.gpu
def test_cuda_plain_adam_skip_path_has_no_host_sync():
    """A user's plain (non-fused) Adam: the masked step switches it to device-side step counters."""
    state = SFDState.create(CFG, rgb_teacher(), device="cuda", fused_adam=False)
    train_step(state, options="fused")
    with HostSyncDetector(device="cuda") as syncs:
        for _ in range(2):
            train_step(state, options="fused")
    assert not syncs.found, syncs.report()
    assert state.opt_gen.param_groups[0]["capturable"]
