"""Fused loss kernels vs their references and vs a copy of the same bytes, side by side in one run.

    python -m pytest bench/bench_kernels.py --benchmark-enable -s \\
        --benchmark-json=bench/results/kernels-<device>-<date>.json

Providers per kernel, pass, size and dtype: "torch" (the reference, sfd_fast.core.losses),
"compiled" (torch.compile of the reference), "triton" and "cuda" (through
``sfd_fast.core.dispatch.resolve_backend``; skipped with the reason when they cannot run), and
a "copy" row: a device-to-device copy that moves the same number of bytes, timed the same way,
the bandwidth ceiling. Passes: "fwd" (forward only, no autograd) and "fwd+bwd" (forward, then
the gradients the training step asks for).

GPU timing (bench/_timing.py): CUDA events around rounds of back-to-back CUDA-graph replays of
one iteration (host launch overhead out of the picture), L2 overwritten with a 2x-L2 buffer
before every round, median and IQR over rounds, per iteration. The streaming sizes have working
sets >= 256 MiB (several times any L2); the "cifar-b128" size is the training step's loss
(CIFAR batch 112 + 16) and fits in L2, which its ``l2_note`` says.
CPU: small sizes, host perf_counter, fp32 only; Triton and CUDA are skipped (the Triton
interpreter times Python, not a kernel). The module refuses to run under TRITON_INTERPRET=1.

GB/s = ``traffic_bytes`` / median time, one explicit byte count per (kernel, pass) used for
every provider, so GB/s ratios are speed ratios; ``fraction_of_copy`` = GB/s / copy GB/s of the
same bytes. A provider that moves more than the count (the eager reference writes temporaries;
a kernel that writes a gradient nobody asked for) shows as a lower GB/s, not a larger count.

Selection: $SFD_BENCH_KERNEL_PROVIDERS (comma list, default all; SFD_BENCH_QUICK=1 drops
"compiled", whose compile per shape and dtype costs more than the whole quick run).
SFD_BENCH_QUICK=1 also keeps one streaming size and fewer rounds.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import pytest
import torch

import _timing
from sfd_fast.core import dispatch, losses

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: timings would measure the interpreter, not kernels",
                allow_module_level=True)

pytestmark = pytest.mark.benchmark(timer=_timing.TIMER)

ALPHA, OMEGA_MIN = 1.2, 1e-5
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
QUICK = _timing.quick()


@dataclass(frozen=True)
class Size:
    name: str
    shape: tuple[int, ...]  # (B, C, H, W) of each image-shaped input

    def __str__(self) -> str:
        return self.name


GPU_SIZES = [
    Size("cifar-b128", (128, 3, 32, 32)),          # the train-step bench's loss: 393k elements per input
    Size("stream-64M", (1024, 4, 128, 128)),       # 2^26 elements per input, rows of 65536 (SD-XL latents)
    Size("stream-64M-long-rows", (64, 4, 512, 512)),  # same bytes, rows of 2^20: many chunks per row
]
CPU_SIZES = [Size("cpu-b8", (8, 3, 32, 32)), Size("cpu-b64", (64, 3, 32, 32))]
_SIZES = (GPU_SIZES[:2] if QUICK else GPU_SIZES) if CUDA else (CPU_SIZES[1:] if QUICK else CPU_SIZES)
SIZES = {s.name: s for s in _SIZES}  # parametrized by name: plain strings in the result JSON
DTYPES = ["float32", "bfloat16"] if CUDA else ["float32"]
PASSES = ["fwd", "fwd+bwd"]
KERNELS = ["sid", "edm"]
ALL_PROVIDERS = ["torch", "compiled", "triton", "cuda"]
_chosen = os.environ.get("SFD_BENCH_KERNEL_PROVIDERS")
PROVIDERS = ([p.strip() for p in _chosen.split(",") if p.strip()] if _chosen
             else [p for p in ALL_PROVIDERS if not (QUICK and p == "compiled")])
ROUNDS = (10 if QUICK else 30) if CUDA else (3 if QUICK else 5)
ROUND_SECONDS = 2e-3 if QUICK else 5e-3  # GPU time per round (iterations chosen to match)
_rows: dict[tuple, dict] = {}  # (kernel, pass, size, dtype, provider) -> extra_info


def traffic_bytes(kernel: str, pass_: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, int]:
    """Minimum HBM traffic of one call, as {"read", "written", "total"} bytes.

    N = elements of one image-shaped input x its dtype size; B = batch. Counted:
    - forward, both kernels: one read of every input (sid: x_g, y_real, y_fake = 3N; edm:
      denoised, target = 2N) plus the (B,) fp32 weight; written: per_sample (B,) fp32.
    - backward: the gradient formulas need every image input again (sid 3N, edm 2N read), and
      write the gradients the step asks for: sid d/dx_g, d/dy_real, d/dy_fake (3N, the
      generator step); edm d/ddenoised only (1N: the fake-score step detaches the target).
    So fwd+bwd = sid 9N, edm 5N (+ O(B)). Scalars (total, omega, the upstream gradient) and
    reduction partials are left out (O(B x chunks) bytes).
    """
    numel = 1
    for s in shape:
        numel *= s
    n = numel * torch.empty((), dtype=dtype).element_size()
    b = shape[0] * 4
    inputs = {"sid": 3, "edm": 2}[kernel]
    grads = {"sid": 3, "edm": 1}[kernel]
    read, written = inputs * n + b, b
    if pass_ == "fwd+bwd":
        read += inputs * n
        written += grads * n
    return {"read": read, "written": written, "total": read + written}


def working_set_bytes(kernel: str, pass_: str, shape, dtype) -> int:
    """Distinct bytes one iteration touches: the inputs, plus the gradients on fwd+bwd."""
    numel = 1
    for s in shape:
        numel *= s
    n = numel * torch.empty((), dtype=dtype).element_size()
    return ({"sid": 3, "edm": 2}[kernel] + (0 if pass_ == "fwd" else {"sid": 3, "edm": 1}[kernel])) * n


def _losses(provider: str) -> dispatch.LossFunctions:
    """The loss functions of ``provider``, or pytest.skip with the reason they cannot run here."""
    if provider == "compiled":
        sid = torch.compile(losses.sid_generator_loss, fullgraph=True, dynamic=False)
        edm = torch.compile(losses.edm_denoising_loss, fullgraph=True, dynamic=False)
        return dispatch.LossFunctions("compiled", sid, edm)
    try:
        return dispatch.resolve_backend(provider, DEVICE)
    except RuntimeError as exc:
        why = " (on CPU the Triton interpreter would time Python, not a kernel)" if provider == "triton" else ""
        pytest.skip(f"{provider} cannot run on {DEVICE}: {exc}{why}")


def _inputs(shape, dtype, n: int, seed: int = 0):
    """``n`` image tensors (B, C, H, W) of ``dtype`` plus weight (B,) fp32, all contiguous."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    images = [torch.randn(shape, generator=g, device=DEVICE).to(dtype) for _ in range(n)]
    return images, torch.rand(shape[0], generator=g, device=DEVICE) + 0.5


@pytest.fixture(autouse=True)
def _fresh_memory():
    _timing.peak_memory_reset(DEVICE)
    yield
    gc.collect()  # drop the test's graph and its memory pool before the next size
    if CUDA:
        torch.cuda.empty_cache()


def _measure(benchmark, step) -> dict:
    """Times ``step`` with the suite's method; returns what to store about how it was timed."""
    if CUDA:
        run, how = _timing.graphed(step)
        iterations = _timing.iterations_for(run, ROUND_SECONDS)
        benchmark.pedantic(run, rounds=ROUNDS, iterations=iterations, warmup_rounds=1)
        return {"timing": f"CUDA events; a round = {iterations} back-to-back {how}; L2 flushed before each round",
                "iterations_per_round": iterations}
    step()  # warm-up: allocator, compilation
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    return {"timing": f"CPU host perf_counter, 1 iteration per round, {torch.get_num_threads()} torch threads",
            "iterations_per_round": 1}


def _record(benchmark, kernel, pass_, size, dtype, provider, how: dict) -> None:
    traffic = traffic_bytes(kernel, pass_, size.shape, dtype)
    ws = working_set_bytes(kernel, pass_, size.shape, dtype)
    info = benchmark.extra_info
    info["pass"] = pass_
    info.update(kernel=kernel, provider=provider, size=size.name, shape=list(size.shape),
                dtype=str(dtype).removeprefix("torch."), device=str(DEVICE), bytes_read=traffic["read"],
                bytes_written=traffic["written"], bytes_counted=traffic["total"], working_set_bytes=ws,
                l2_cache_bytes=_timing.l2_bytes(), l2_note=_timing.l2_note(ws), **how, **_timing.peak_memory(DEVICE))
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    median = stats.stats.median
    info["median_s"], info["gbps"] = median, traffic["total"] / median / 1e9
    copy = _rows.get((kernel, pass_, size.name, info["dtype"], "copy"))
    if copy is not None and provider != "copy":
        info["copy_gbps"] = copy["gbps"]
        info["fraction_of_copy"] = info["gbps"] / copy["gbps"]
    _rows[(kernel, pass_, size.name, info["dtype"], provider)] = dict(info)


@pytest.fixture(scope="module", autouse=True)
def print_table(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if not _rows or reporter is None:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")  # teardown output is captured
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(f"fused losses on {DEVICE}: median per iteration; GB/s from traffic_bytes(); "
                            "'of copy' = GB/s / copy GB/s of the same bytes, timed the same way")
        reporter.write_line(f"{'kernel':6} {'pass':8} {'size':22} {'dtype':9} {'provider':9} {'median us':>10} "
                            f"{'GB/s':>8} {'of copy':>8}")
        for (kernel, pass_, size, dtype, provider), row in sorted(_rows.items()):
            frac = f"{row['fraction_of_copy']:7.0%}" if "fraction_of_copy" in row else "       -"
            reporter.write_line(f"{kernel:6} {pass_:8} {size:22} {dtype:9} {provider:9} {row['median_s'] * 1e6:10.1f} "
                                f"{row['gbps']:8.1f} {frac:>8}")


# Copy first: the provider rows of the same bytes read its GB/s when they are recorded.
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", list(SIZES))
def test_copy_bandwidth(benchmark, size, dtype, kernel, pass_):
    """The ceiling: a device-to-device copy of traffic_bytes(kernel, pass_)/2 bytes (read + write = the count)."""
    size, dtype = SIZES[size], getattr(torch, dtype)
    total = traffic_bytes(kernel, pass_, size.shape, dtype)["total"]
    elements = total // (2 * torch.empty((), dtype=dtype).element_size())
    src = torch.ones(elements, dtype=dtype, device=DEVICE)  # contents do not change a copy's speed
    dst = torch.empty_like(src)
    how = _measure(benchmark, lambda: dst.copy_(src))
    _record(benchmark, kernel, pass_, size, dtype, "copy", how)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", list(SIZES))
def test_sid_loss(benchmark, size, dtype, pass_, provider):
    size, dtype = SIZES[size], getattr(torch, dtype)
    fns = _losses(provider)
    (x, yr, yf), w = _inputs(size.shape, dtype, 3)
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                return fns.sid_generator_loss(x, yr, yf, w, alpha=ALPHA, omega_min=OMEGA_MIN)
    else:
        for t in (x, yr, yf):
            t.requires_grad_(True)

        def step():
            total, _ = fns.sid_generator_loss(x, yr, yf, w, alpha=ALPHA, omega_min=OMEGA_MIN)
            return torch.autograd.grad(total, (x, yr, yf))
    how = _measure(benchmark, step)
    _record(benchmark, "sid", pass_, size, dtype, provider, how)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", list(SIZES))
def test_edm_loss(benchmark, size, dtype, pass_, provider):
    size, dtype = SIZES[size], getattr(torch, dtype)
    fns = _losses(provider)
    (d, t), w = _inputs(size.shape, dtype, 2)
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                return fns.edm_denoising_loss(d, t, w)
    else:
        d.requires_grad_(True)  # the fake-score step: gradient to D only, the target is detached

        def step():
            total, _ = fns.edm_denoising_loss(d, t, w)
            return torch.autograd.grad(total, (d,))
    how = _measure(benchmark, step)
    _record(benchmark, "edm", pass_, size, dtype, provider, how)
