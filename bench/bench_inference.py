"""Inference: one-step generator (eager, torch.compile, onnxruntime, TensorRT) vs the teacher's Heun sampler.

Groups: latency-b1 (batch 1) and throughput-b64 (batch 64). Every entry records ``images`` and
``nfe`` in extra_info; the one-step speed-up per image = teacher-heun mean / provider mean in the
same group (same batch, same run). Preset: SFD_BENCH_PRESET=tiny|demo (default tiny).
Timing: host perf_counter around one call followed by ``torch.cuda.synchronize()``: the latency
a caller sees, launches and (for onnxruntime, whose runner takes and returns torch tensors)
host <-> device copies included. The onnxruntime rows record the execution provider that ran
(``ort_providers``): CUDAExecutionProvider needs the onnxruntime-gpu wheel; with plain
onnxruntime a GPU machine's onnxruntime row is a CPU number, and its ``note`` says so.
SFD_BENCH_QUICK=1 (bench/gpu_check.sh): fewer rounds.

    python -m pytest bench/bench_inference.py --benchmark-enable --benchmark-json=bench/results/inference-cpu.json
"""

from __future__ import annotations

import os

import pytest
import torch

import _timing
from sfd_fast import EDMDenoiser, UNetConfig, build_unet
from sfd_fast.models.networks import OneStepGenerator
from sfd_fast.models.sampler import edm_heun_sample, heun_nfe
from sfd_fast.serve import OnnxRuntimeRunner, TorchRunner, build_engine, load_runner, tensorrt_available, to_onnx

PRESET = os.environ.get("SFD_BENCH_PRESET", "tiny")
BATCHES = {"latency-b1": 1, "throughput-b64": 64}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name(PRESET)))).eval()


@pytest.fixture(scope="module")
def onnx_path(generator, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "g.onnx"
    to_onnx(generator, path, exporter="torchscript")
    return path


def _inputs(generator, b):
    z = torch.randn(b, *generator.denoiser.image_shape, device=DEVICE)
    return z, torch.arange(b, device=DEVICE) % generator.denoiser.num_classes


def _run(benchmark, group, fn, nfe):
    b = BATCHES[group]
    benchmark.group = group
    benchmark.extra_info.update(images=b, nfe=nfe, preset=PRESET, device=DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def call():
        out = fn()
        sync()
        return out

    call()  # warm-up (compilation, allocator)
    rounds = (3 if b > 1 else 10) if _timing.quick() else (5 if b > 1 else 20)
    benchmark.pedantic(call, rounds=rounds, iterations=1)


@pytest.mark.parametrize("group", BATCHES)
def test_torch_eager(benchmark, generator, group):
    runner = TorchRunner(generator, DEVICE)
    z, c = _inputs(generator, BATCHES[group])
    _run(benchmark, group, lambda: runner(z, c), 1)


@pytest.mark.parametrize("group", BATCHES)
def test_torch_compile(benchmark, generator, group):
    runner = TorchRunner(generator, DEVICE, compile=True)
    z, c = _inputs(generator, BATCHES[group])
    _run(benchmark, group, lambda: runner(z, c), 1)


@pytest.mark.parametrize("group", BATCHES)
def test_onnxruntime(benchmark, generator, onnx_path, group):
    runner = OnnxRuntimeRunner(onnx_path)
    session = getattr(runner, "session", None)
    used = session.get_providers() if session is not None else ["unknown"]
    benchmark.extra_info["ort_providers"] = used
    if DEVICE == "cuda" and "CUDAExecutionProvider" not in used:
        benchmark.extra_info["note"] = ("onnxruntime ran on CPUExecutionProvider: CUDAExecutionProvider is not "
                                        "available (install onnxruntime-gpu)")
    z, c = _inputs(generator, BATCHES[group])
    _run(benchmark, group, lambda: runner(z, c), 1)


_TRT_OK, _TRT_WHY = tensorrt_available()


@pytest.mark.skipif(not _TRT_OK, reason=f"TensorRT unavailable: {_TRT_WHY}")
@pytest.mark.parametrize("group", BATCHES)
def test_tensorrt_fp16(benchmark, generator, onnx_path, group):
    runner = load_runner(build_engine(onnx_path, precision="fp16", batch_sizes=(1, 64, 128)))
    z, c = _inputs(generator, BATCHES[group])
    _run(benchmark, group, lambda: runner(z, c), 1)


@pytest.mark.parametrize("group", BATCHES)
def test_teacher_heun18(benchmark, generator, group):
    teacher = generator.denoiser.to(DEVICE)  # same network, so per-NFE cost is identical
    z, c = _inputs(generator, BATCHES[group])
    _run(benchmark, group, lambda: edm_heun_sample(teacher, z, c, num_steps=18), heun_nfe(18))


@pytest.mark.parametrize("group", BATCHES)
def test_interleaved(benchmark, generator, onnx_path, group):
    """The teacher's sampler and every one-step provider round-robin in one process
    (``_timing.interleaved``): the per-image speed-ups to quote, at the thread count in force
    (``torch_threads``; onnxruntime's intra-op threads are set to the same number, so neither side
    gets more cores than the other). ``ratio_to_teacher_heun18`` = teacher median / provider median
    at the same batch = the one-step speed-up per image."""
    threads = torch.get_num_threads()
    z, c = _inputs(generator, BATCHES[group])
    teacher = generator.denoiser.to(DEVICE)
    eager = TorchRunner(generator, DEVICE)
    ort = OnnxRuntimeRunner(onnx_path, threads=threads)
    calls = {"teacher_heun18": lambda: edm_heun_sample(teacher, z, c, num_steps=18),
             "torch_eager": lambda: eager(z, c), "onnxruntime": lambda: ort(z, c)}
    with torch.no_grad():
        result = _timing.interleaved(calls, rounds=5 if _timing.quick() else 15, warmup=1,
                                     sync=torch.cuda.synchronize if DEVICE == "cuda" else None)
    benchmark.group = f"interleaved-{group}"
    benchmark.pedantic(lambda: [f() for f in calls.values()], rounds=1, iterations=1)
    benchmark.extra_info.update(interleaved=result, torch_threads=threads, ort_intra_op_threads=threads,
                                images=BATCHES[group], preset=PRESET, device=DEVICE, teacher_nfe=heun_nfe(18))
    _timing.print_interleaved(f"inference {group} ({PRESET})", result, threads)
