"""LoRA mode vs full fine-tuning (issue 18): step time and memory, providers interleaved in one process.

    OMP_NUM_THREADS=1 python -m pytest bench/bench_lora.py --benchmark-enable \
        --benchmark-json=bench/results/lora-step-<device>-<date>.json

Providers, same teacher, config and seed:
- ``full``: the reference step, fake score and G fully fine-tuned (the default);
- ``lora_fused``: fake score = teacher + LoRA (rank ``RANK``), teacher and fake score as ONE 2B call;
- ``lora_two_calls``: the same LoRA state with the two B calls (``LoRAConfig(fused=False)``): the fusion alone;
- ``lora_generator``: fake score and G both teacher + LoRA (fused).
Each timed round runs one step of every provider in turn (A B C D A B C D ...), so a change in
the shared machine's load hits all of them alike; pytest-benchmark's own statistics are those of
the whole round, the per-provider medians and IQRs are in ``extra_info``.

Memory, per provider: ``state_bytes`` counts the state's tensors exactly (weights and buffers with
shared storage once, gradients, Adam states; ``core.lora.state_bytes``). CUDA: also the step's
transient peak (``max_memory_allocated`` during its step minus what was allocated before it:
activations and temporaries). CPU: the process peak RSS is one number for all providers
(interleaved), so only the exact counts are per provider; scripts/lora_vs_full.py runs each mode
in its own process for its RSS.

CPU: the demo's scale (the "demo" UNet, ~1.1M parameters, 16x16, the "demo" preset's batch 32 + 16),
threads pinned to $SFD_BENCH_THREADS (default 1) and recorded. GPU: the ~49M-parameter CIFAR-scale
UNet of bench_train_step.py at batch 112 + 16. SFD_BENCH_QUICK=1: fewer rounds.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import pytest
import torch

import _timing
from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet, train_step
from sfd_fast.core.lora import LoRAConfig, state_bytes

pytest.importorskip("peft", reason="LoRA mode needs peft (pip install peft)")

RANK = 16  # the LoRA rank of docs/lora.md's demo comparison
CIFAR_50M = UNetConfig(resolution=32, channels=3, block_out_channels=(128, 256, 256, 256),
                       attention_levels=(False, True, True, False), layers_per_block=3,
                       norm_num_groups=32, attention_head_dim=64)
ROUNDS = {"cpu": (1, 2), "cuda": (2, 5)} if _timing.quick() else {"cpu": (1, 5), "cuda": (3, 20)}
PROVIDERS = {"full": None, "lora_fused": LoRAConfig(rank=RANK), "lora_two_calls": LoRAConfig(rank=RANK, fused=False),
             "lora_generator": LoRAConfig(rank=RANK, generator=True)}


def scale(device: torch.device):
    if device.type == "cuda":
        return CIFAR_50M, SFDConfig(batch_size=112, forget_batch_size=16)
    return UNetConfig.from_name("demo"), SFDConfig.from_name("demo")


@pytest.fixture(scope="module")
def states(bench_device):
    if bench_device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("SFD_BENCH_THREADS", "1")))
    unet_cfg, sfd_cfg = scale(bench_device)
    torch.manual_seed(0)
    teacher = EDMDenoiser(build_unet(unet_cfg)).to(bench_device).eval()
    return {name: SFDState.create(sfd_cfg, copy.deepcopy(teacher), device=bench_device, lora=lora)
            for name, lora in PROVIDERS.items()}, sfd_cfg


def test_lora_vs_full_step(benchmark, states, bench_device):
    states, cfg = states
    cuda = bench_device.type == "cuda"
    times = {name: [] for name in states}
    transient = {name: 0 for name in states}

    def one(name):
        state = states[name]
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        metrics = train_step(state)
        if cuda:
            torch.cuda.synchronize()
        times[name].append(time.perf_counter() - t0)
        if cuda:
            transient[name] = max(transient[name], torch.cuda.max_memory_allocated() - before)
        return metrics

    def round_():
        return {name: one(name) for name in states}

    warmup, rounds = ROUNDS[bench_device.type]
    for _ in range(warmup):
        round_()
    for name in times:
        times[name].clear()
    out = benchmark.pedantic(round_, rounds=rounds, iterations=1)
    assert all(torch.isfinite(v.float()).all() for m in out.values() for v in m.values())

    info = benchmark.extra_info
    info.update(device=str(bench_device), torch_threads=torch.get_num_threads(), lora_rank=RANK,
                batch_images=cfg.batch_size + cfg.forget_batch_size, rounds=rounds, warmup_rounds=warmup,
                interleaved="each round: one step of every provider in turn", timer="host perf_counter"
                + (" + cuda.synchronize" if cuda else ""))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0], ts[0], ts[0]]
        info[name] = {"step_seconds_median": medians[name], "step_seconds_iqr": [q[0], q[2]],
                      "step_seconds_all": ts, "ratio_to_full": medians[name] / medians["full"],
                      "state_bytes": state_bytes(states[name]),
                      **({"step_transient_peak_bytes": transient[name]} if cuda else {})}
    info["fusion_speedup_two_calls_over_fused"] = medians["lora_two_calls"] / medians["lora_fused"]
    info.update(_timing.peak_memory(bench_device))
    info["peak_memory_note"] = ("CUDA: process-wide peak; per provider see step_transient_peak_bytes" if cuda else
                                "CPU: process peak RSS over all providers (interleaved); per provider only state_bytes")
