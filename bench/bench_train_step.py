"""Train-step throughput: reference eager fp32, eager bf16, fused fp32, full fast path, one run.

    python -m pytest bench/bench_train_step.py --benchmark-enable \
        --benchmark-json=bench/results/train_step-<device>-<date>.json

Same model, batch and seed for every provider. Reported per provider in ``extra_info``:
images/s and steps/s (from the median), ratio to the reference measured in this run, FLOPs of
one step from the explicit per-provider model of bench/_flops.py (``step_flops_model``, with its
passes: a provider that reuses the G sample does 10 UNet forwards of work where the reference
does 11) next to a FlopCounterMode count of one eager-equivalent step of the same provider
(``step_flops_counted``), achieved model FLOP/s, MFU = model FLOPs / time / the device's dense
bf16 peak and HFU = counted FLOPs / time / peak (GPU only, for every provider incl. the fp32
ones; on CPU no peak is meaningful and both are null; attention run by xformers is invisible
to FlopCounterMode, so HFU reads low when xformers is installed), and peak memory (CUDA:
max_memory_allocated per provider; CPU: process peak RSS so far, cumulative in provider order).
Timing: host perf_counter around a step followed by ``torch.cuda.synchronize()`` (a step is
milliseconds or more; host work inside it is part of its cost).

CPU: tiny UNet, batch 8 + 4, compile off (inductor on 2 cores takes minutes).
GPU: a CIFAR-scale EDM-like UNet (32x32x3, ~49M parameters), batch 112 + 16 = 128.
SFD_BENCH_QUICK=1 (bench/gpu_check.sh): fewer rounds, and on GPU the "fast" provider with
compile off (inductor compiling this UNet takes minutes with a cold cache: more than the
whole check's budget); ``extra_info.note`` says so.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import _flops
import _timing
from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet, train_step
from sfd_fast.core.step_options import StepOptions
from sfd_fast.models.networks import count_parameters

# ~49M parameters: the "cifar" preset (36M) with 3 resnets per level and attention at 16x16 and 8x8.
CIFAR_50M = UNetConfig(resolution=32, channels=3, block_out_channels=(128, 256, 256, 256),
                       attention_levels=(False, True, True, False), layers_per_block=3,
                       norm_num_groups=32, attention_head_dim=64)
# (warmup rounds, timed rounds)
ROUNDS = {"cpu": (1, 2), "cuda": (2, 5)} if _timing.quick() else {"cpu": (2, 5), "cuda": (5, 20)}
_MEDIANS: dict[str, float] = {}


def scale(device: torch.device):
    """(UNet config, SFD config) measured on this device."""
    if device.type == "cuda":
        return CIFAR_50M, SFDConfig(batch_size=112, forget_batch_size=16)
    return UNetConfig.from_name("tiny"), SFDConfig(batch_size=8, forget_batch_size=4)


def providers(device: torch.device) -> dict[str, StepOptions | None]:
    fast = StepOptions.from_name("fast")
    if device.type != "cuda" or _timing.quick():
        fast = fast.replace(compile="off")  # see note(); inductor compile of the UNet takes minutes
    return {"reference_fp32": None, "eager_bf16": StepOptions.from_name("bf16"),
            # fp32 fused path with one shared G sample: isolates the fusions from bf16/compile/graphs.
            "fused_fp32_shared": StepOptions(fused=True, share_noise=True), "fast": fast}


def note(provider: str, device: torch.device) -> str | None:
    if provider != "fast":
        return None
    if device.type != "cuda":
        return "compile off: inductor compiling the UNet takes minutes on a 2-core CPU"
    if _timing.quick():
        return "compile off: SFD_BENCH_QUICK=1 (gpu_check budget); run without it for the compiled fast path"
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
    return {"teacher": teacher, "config": sfd_cfg, "unet": unet_cfg, "images": n,
            "unet_forward_flops": fwd.get_total_flops(), "params": count_parameters(teacher)}


@pytest.mark.parametrize("provider", ["reference_fp32", "eager_bf16", "fused_fp32_shared", "fast"])
def test_train_step(benchmark, setup, bench_device, provider):
    options = providers(bench_device)[provider]

    def make_state():
        return SFDState.create(setup["config"], copy.deepcopy(setup["teacher"]), device=bench_device)

    model = _flops.step_flops(setup["unet_forward_flops"], options)
    counted = _flops.counted_step_flops(make_state, options, train_step)
    state = make_state()
    cuda = bench_device.type == "cuda"

    def step():
        metrics = train_step(state, options=options)
        if cuda:
            torch.cuda.synchronize()  # time the work, not the launch
        return metrics

    gc.collect()  # the counted step's state
    _timing.peak_memory_reset(bench_device)
    warmup, rounds = ROUNDS[bench_device.type]
    if options is not None and options.cuda_graph != "off":
        warmup = max(warmup, options.warmup_steps + 1)  # capture happens outside the timed rounds
    metrics = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert all(torch.isfinite(v.float()) for v in metrics.values())

    info = benchmark.extra_info
    info.update(provider=provider, options=None if options is None else options.to_dict(),
                note=note(provider, bench_device), unet_params=setup["params"], batch_images=setup["images"],
                unet_forward_flops=setup["unet_forward_flops"], step_flops_model=model["total"],
                step_flops_model_passes=model["passes"], step_units_of_forward=model["units_of_forward"],
                step_flops_counted=counted,
                flop_model_over_counted=model["total_with_recompute"] / counted if counted else None,
                peak_flops=_flops.peak_flops(bench_device),
                peak_flops_note=("dense bf16 peak of the device" if cuda
                                 else "CPU: no meaningful peak, MFU not reported"))
    info.update(_timing.peak_memory(bench_device))
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the step ran once, nothing was timed
        return
    median = stats.stats.median
    _MEDIANS[provider] = median
    info["steps_per_s"] = 1.0 / median
    info["images_per_s"] = setup["images"] / median
    # MFU from this provider's own FLOP model: reusing the G sample is less work, not faster work.
    info["achieved_flops_per_s"] = model["total"] / median
    info["mfu"] = model["total"] / median / info["peak_flops"] if info["peak_flops"] else None
    info["hfu"] = counted / median / info["peak_flops"] if info["peak_flops"] and counted else None
    if "reference_fp32" in _MEDIANS:
        info["speedup_vs_reference"] = _MEDIANS["reference_fp32"] / median
    if "eager_bf16" in _MEDIANS and provider == "fast":
        info["speedup_vs_eager_bf16"] = _MEDIANS["eager_bf16"] / median


def test_train_step_interleaved(benchmark, setup, bench_device):
    """Every provider's step round-robin in one process (``_timing.interleaved``): the ratios to
    quote. One benchmark round = one step of each provider; ``extra_info.interleaved`` holds each
    provider's median and IQR over the rounds and its ratio to the reference. ``fused_fp32`` (no
    shared G sample) is here to separate the fusions from the sampling change of ``share_noise``."""
    options = {**providers(bench_device), "fused_fp32": StepOptions(fused=True)}
    order = ["reference_fp32", "fused_fp32", "fused_fp32_shared", "eager_bf16", "fast"]
    states = {name: SFDState.create(setup["config"], copy.deepcopy(setup["teacher"]), device=bench_device)
              for name in order}
    calls = {name: (lambda n=name: train_step(states[n], options=options[n])) for name in order}
    sync = torch.cuda.synchronize if bench_device.type == "cuda" else None
    warmup, rounds = ROUNDS[bench_device.type]
    if bench_device.type == "cuda":
        warmup = max(warmup, max(o.warmup_steps + 1 for o in options.values() if o is not None))
    result = _timing.interleaved(calls, rounds=max(rounds, 15), warmup=warmup, sync=sync)
    benchmark.pedantic(lambda: [c() for c in calls.values()], rounds=1, iterations=1)
    benchmark.extra_info.update(interleaved=result, torch_threads=torch.get_num_threads(),
                                options={n: None if o is None else o.to_dict() for n, o in options.items()},
                                batch_images=setup["images"], unet_params=setup["params"])
    _timing.print_interleaved(f"train_step, {setup['images']} images, {setup['params'] / 1e6:.2f}M-param UNet",
                              result, torch.get_num_threads())
