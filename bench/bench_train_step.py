"""Train-step throughput: reference eager fp32, eager bf16, fused fp32, full fast path, one run.

    python -m pytest bench/bench_train_step.py --benchmark-enable \
        --benchmark-json=bench/results/train_step-<device>-<date>.json

Same model, batch and seed for every provider. Reported per provider in ``extra_info``:
images/s and steps/s (from the median), ratio to the reference measured in this run, counted
FLOPs (torch.utils.flop_counter.FlopCounterMode: one UNet forward, and one whole reference step
forward + backward), MFU against the device's dense bf16 peak (GPU only; on CPU no peak is
meaningful and MFU is null), and peak memory (CUDA: max_memory_allocated per provider; CPU:
process peak RSS so far, cumulative in provider order).

CPU: tiny UNet, batch 8 + 4, compile off (inductor on 2 cores takes minutes).
GPU: a CIFAR-scale EDM-like UNet (32x32x3, ~49M parameters), batch 112 + 16 = 128.
"""

from __future__ import annotations

import copy
import resource

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet, train_step
from sfd_fast.core.step_options import StepOptions
from sfd_fast.models.networks import count_parameters

# ~49M parameters: the "cifar" preset (36M) with 3 resnets per level and attention at 16x16 and 8x8.
CIFAR_50M = UNetConfig(resolution=32, channels=3, block_out_channels=(128, 256, 256, 256),
                       attention_levels=(False, True, True, False), layers_per_block=3,
                       norm_num_groups=32, attention_head_dim=64)
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s.
DENSE_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
ROUNDS = {"cpu": (2, 5), "cuda": (5, 20)}  # (warmup rounds, timed rounds)
_MEDIANS: dict[str, float] = {}


def scale(device: torch.device):
    """(UNet config, SFD config) measured on this device."""
    if device.type == "cuda":
        return CIFAR_50M, SFDConfig(batch_size=112, forget_batch_size=16)
    return UNetConfig.from_name("tiny"), SFDConfig(batch_size=8, forget_batch_size=4)


def providers(device: torch.device) -> dict[str, StepOptions | None]:
    fast = StepOptions.from_name("fast")
    if device.type != "cuda":
        fast = fast.replace(compile="off")  # inductor compile of the UNet takes minutes on 2 cores
    return {"reference_fp32": None, "eager_bf16": StepOptions.from_name("bf16"),
            # fp32 fused path with one shared G sample: isolates the fusions from bf16/compile/graphs.
            "fused_fp32_shared": StepOptions(fused=True, share_noise=True), "fast": fast}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in DENSE_BF16_PEAK.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return value
    return None


@pytest.fixture(scope="module")
def setup(bench_device):
    unet_cfg, sfd_cfg = scale(bench_device)
    torch.manual_seed(0)
    teacher = EDMDenoiser(build_unet(unet_cfg)).to(bench_device).eval()
    n = sfd_cfg.batch_size + sfd_cfg.forget_batch_size
    x = torch.randn(n, *teacher.image_shape, device=bench_device)
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            teacher(x, torch.ones(n, device=bench_device), torch.zeros(n, dtype=torch.long, device=bench_device))
    state = SFDState.create(sfd_cfg, copy.deepcopy(teacher), device=bench_device)
    with FlopCounterMode(display=False) as step:
        train_step(state)
    return {"teacher": teacher, "config": sfd_cfg, "unet": unet_cfg, "images": n,
            "unet_forward_flops": fwd.get_total_flops(), "step_flops": step.get_total_flops(),
            "params": count_parameters(teacher)}


@pytest.mark.parametrize("provider", ["reference_fp32", "eager_bf16", "fused_fp32_shared", "fast"])
def test_train_step(benchmark, setup, bench_device, provider):
    options = providers(bench_device)[provider]
    state = SFDState.create(setup["config"], copy.deepcopy(setup["teacher"]), device=bench_device)
    cuda = bench_device.type == "cuda"

    def step():
        metrics = train_step(state, options=options)
        if cuda:
            torch.cuda.synchronize()  # time the work, not the launch
        return metrics

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warmup, rounds = ROUNDS[bench_device.type]
    if options is not None and options.cuda_graph != "off":
        warmup = max(warmup, options.warmup_steps + 1)  # capture happens outside the timed rounds
    metrics = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert all(torch.isfinite(v.float()) for v in metrics.values())

    info = benchmark.extra_info
    info.update(provider=provider, options=None if options is None else options.to_dict(),
                unet_params=setup["params"], batch_images=setup["images"],
                unet_forward_flops=setup["unet_forward_flops"], step_flops_reference=setup["step_flops"],
                peak_flops=peak_flops(bench_device),
                peak_flops_note="dense bf16 peak of the device" if cuda else "CPU: no meaningful peak, MFU not reported")
    if cuda:
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        info["peak_rss_bytes_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the step ran once, nothing was timed
        return
    median = stats.stats.median
    _MEDIANS[provider] = median
    info["steps_per_s"] = 1.0 / median
    info["images_per_s"] = setup["images"] / median
    # MFU counts the reference step's FLOPs for every provider (same model work per step).
    info["mfu"] = setup["step_flops"] / median / info["peak_flops"] if info["peak_flops"] else None
    if "reference_fp32" in _MEDIANS:
        info["speedup_vs_reference"] = _MEDIANS["reference_fp32"] / median
    if "eager_bf16" in _MEDIANS and provider == "fast":
        info["speedup_vs_eager_bf16"] = _MEDIANS["eager_bf16"] / median
