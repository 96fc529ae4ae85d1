"""The fused-path-equals-reference check shared by the config and schedule tests."""

from __future__ import annotations

import copy

import torch

from sfd_fast import SFDState, train_step
from sfd_fast.core.step_options import StepOptions


def assert_fused_equals_reference(cfg, teacher, steps: int = 3):
    """Run ``steps`` reference and fused (fp32) steps from the same state; metrics within 1e-6 and the
    generator, its EMA and the fake score within 1e-6 (fp32: only summation order differs). Returns both states."""
    runs = []
    for options in (None, StepOptions(fused=True)):
        state = SFDState.create(cfg, copy.deepcopy(teacher))
        runs.append((state, [train_step(state, options=options) for _ in range(steps)]))
    (ref, ref_m), (fast, fast_m) = runs
    for r, f in zip(ref_m, fast_m):
        for key in r:
            torch.testing.assert_close(f[key].float(), r[key].float(), rtol=1e-6, atol=1e-6, msg=key)
    for name in ("generator", "generator_ema", "fake"):
        for a, b in zip(getattr(ref, name).parameters(), getattr(fast, name).parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    return ref, fast
