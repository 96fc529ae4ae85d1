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


def adam_noise_envelope(cfg, steps: int) -> float:
    """Largest difference two runs can put on one weight in ``steps`` Adam steps (beta1 = 0), whatever
    its gradients: with no momentum |step_t| = lr |g_t| / sqrt(v_t / (1 - beta2^t)) and v_t >= (1 - beta2) g_t^2,
    so |step_t| <= lr sqrt((1 - beta2^t) / (1 - beta2)); two runs of opposite sign: twice the sum. For the
    weights whose gradient is pure rounding noise (attention key biases: softmax ignores q.b_k)."""
    beta1, beta2 = cfg.adam_betas
    assert beta1 == 0, "the bound is for Adam without momentum (SiD's betas (0, 0.999))"
    lr = max(cfg.lr_gen, cfg.lr_fake)
    return 2 * lr * sum(((1 - beta2 ** t) / (1 - beta2)) ** 0.5 for t in range(1, steps + 1)) * (1 + 1e-6)
