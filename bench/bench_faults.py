"""Cost of the non-finite guard around an optimizer step, and of full-state checkpoints.

Providers side by side (one run, ratios vs "plain"): the optimizer step with no guard
(``plain``: foreach Adam, the core's original path), the guard with the masked fallback
(``guarded_masked``: snapshot + torch.where), fused Adam alone (``fused_plain``) and fused Adam
with its found_inf input (``guarded_fused``, what sfd_fast.core.faults uses for fused optimizers).
Model: the generator of the "demo" UNet preset (~1M parameters) with random gradients.

    python -m pytest bench/bench_faults.py --benchmark-enable --benchmark-json=bench/results/faults-<device>-<date>.json
"""

from __future__ import annotations

import pytest
import torch

from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet
from sfd_fast.core.faults import check_finite, guarded_step

PROVIDERS = ["plain", "guarded_masked", "fused_plain", "guarded_fused"]


def make_state(device, fused: bool) -> SFDState:
    """Setup shared by the providers: a demo-size SFDState with gradients in place."""
    torch.manual_seed(0)
    teacher = EDMDenoiser(build_unet(UNetConfig.from_name("demo"))).to(device)
    state = SFDState.create(SFDConfig(), teacher, device)
    if fused:
        state.opt_gen = torch.optim.Adam(state.generator.parameters(), lr=1e-5, betas=(0.0, 0.999), fused=True)
    for p in state.generator.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return state


@pytest.mark.parametrize("provider", PROVIDERS)
def test_optimizer_step(benchmark, provider, bench_device):
    state = make_state(bench_device, fused=provider.endswith("fused") or provider == "fused_plain")
    loss = torch.zeros((), device=bench_device)
    n_params = sum(p.numel() for p in state.generator.parameters())
    benchmark.extra_info.update(provider=provider, params=n_params)

    def plain():
        state.opt_gen.step()

    def guarded():
        guarded_step(state, "gen", state.opt_gen, check_finite(loss, state.generator.parameters()))

    fn = plain if provider in ("plain", "fused_plain") else guarded

    def run():
        fn()
        if bench_device.type == "cuda":
            torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=20, iterations=3, warmup_rounds=2)


@pytest.mark.parametrize("what", ["save", "load"])
def test_checkpoint(benchmark, what, bench_device, tmp_path):
    from sfd_fast.train.checkpoint import load_checkpoint, save_checkpoint

    state = make_state(bench_device, fused=False)
    state.opt_gen.step()
    path = save_checkpoint(state, tmp_path)
    size = sum(f.stat().st_size for f in path.iterdir())
    benchmark.extra_info.update(bytes=size)
    if what == "save":
        benchmark.pedantic(lambda: save_checkpoint(state, tmp_path, keep_last=1), rounds=5, iterations=1)
    else:
        benchmark.pedantic(lambda: load_checkpoint(path, state), rounds=5, iterations=1)
