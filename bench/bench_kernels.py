"""Fused loss kernels vs their references: forward + backward, side by side in one run.

    python -m pytest bench/bench_kernels.py --benchmark-enable -s \\
        --benchmark-json=bench/results/kernels-<device>-<date>.json

Providers per kernel and size: "eager" (sfd_fast.core.losses), "compiled" (torch.compile of the
same reference), "triton" (sfd_fast.kernels), "cuda" (sfd_fast.core.cuda_ext, when it loads), and a
device-to-device "copy" row for the bandwidth ceiling. Triton and CUDA need a GPU: on CPU they
are skipped (Triton's interpreter times Python, not a kernel).

Effective GB/s uses one explicit byte count per kernel, the minimum traffic of its fused
forward + backward (what the Triton/CUDA kernels move), for every provider, so GB/s ratios are
speed ratios:
- sid (generator step; grads to x_g, y_r, y_f): read 3N forward + read 3N, write 3N backward = 9N
- edm (fake-score step; grad to D only):          read 2N forward + read 2N, write 1N backward = 5N
- copy: read N + write N = 2N, on a buffer of the sid inputs' size.
(N = elements of one input tensor, times the dtype size.)
"""

from __future__ import annotations

import os

import pytest
import torch

from sfd_fast.core import losses

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: timings would measure the interpreter, not kernels",
                allow_module_level=True)

ALPHA = 1.2
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (B, C, H, W): CIFAR-10 and SD-latent batches on GPU; small on the shared 2-core CPU box.
SIZES = ([(64, 3, 32, 32), (256, 3, 32, 32), (64, 4, 64, 64), (256, 4, 64, 64)] if DEVICE.type == "cuda"
         else [(8, 3, 32, 32), (64, 3, 32, 32)])
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]
PROVIDERS = ["eager", "compiled", "triton", "cuda"]
BYTES_PER_ELEMENT = {"sid": 9, "edm": 5, "copy": 2}
_rows: dict[tuple, tuple[float, int]] = {}  # (kernel, shape, dtype, provider) -> (median s, bytes)


def _sid_ref(x, yr, yf, w):
    return losses.sid_generator_loss(x, yr, yf, w, alpha=ALPHA)


def _fused(provider: str):
    """(sid, edm) functions of ``provider``, or pytest.skip with the reason it cannot run here."""
    if provider == "eager":
        return _sid_ref, losses.edm_denoising_loss
    if provider == "compiled":
        return torch.compile(_sid_ref, fullgraph=True), torch.compile(losses.edm_denoising_loss, fullgraph=True)
    if DEVICE.type != "cuda":
        why = " (the Triton interpreter would time Python, not the kernel)" if provider == "triton" else ""
        pytest.skip(f"{provider} needs a CUDA GPU; none here{why}")
    if provider == "triton":
        from sfd_fast import kernels

        return (lambda x, yr, yf, w: kernels.sid_generator_loss(x, yr, yf, w, alpha=ALPHA)), kernels.edm_denoising_loss
    try:
        from sfd_fast.core import cuda_ext
    except ImportError as exc:
        pytest.skip(f"sfd_fast.core.cuda_ext is not importable: {exc}")
    ok, why = cuda_ext.available()
    if not ok:
        pytest.skip(f"CUDA extension unavailable: {why}")
    return (lambda x, yr, yf, w: cuda_ext.sid_generator_loss(x, yr, yf, w, alpha=ALPHA)), cuda_ext.edm_denoising_loss


def _inputs(shape, dtype, n, requires_grad):
    """``n`` image tensors (B, C, H, W) plus weight (B,): the same setup the tests use."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ts = [torch.randn(shape, generator=g, device=DEVICE).to(dtype).requires_grad_(rg)
          for rg in requires_grad[:n]]
    return ts, torch.rand(shape[0], generator=g, device=DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _record(benchmark, kernel, provider, shape, dtype):
    numel = 1
    for s in shape:
        numel *= s
    nbytes = BYTES_PER_ELEMENT[kernel] * numel * torch.empty((), dtype=dtype).element_size()
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(kernel=kernel, provider=provider, shape=list(shape), dtype=str(dtype),
                                bytes_counted=nbytes, gbps=nbytes / median / 1e9)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    _rows[(kernel, str(shape), str(dtype), provider)] = (median, nbytes)


@pytest.fixture(scope="module", autouse=True)
def print_table(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if not _rows or reporter is None:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")  # teardown output is captured
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(f"fused losses, forward + backward on {DEVICE} (GB/s from the byte counts in the module docstring)")
        reporter.write_line(f"{'kernel':6} {'shape':18} {'dtype':15} {'provider':9} {'median ms':>10} {'GB/s':>8} {'vs eager':>9}")
        for (kernel, shape, dtype, provider), (median, nbytes) in sorted(_rows.items()):
            eager = _rows.get((kernel, shape, dtype, "eager"))
            ratio = f"{eager[0] / median:8.2f}x" if eager else "        -"
            reporter.write_line(f"{kernel:6} {shape:18} {dtype:15} {provider:9} {median * 1e3:10.3f} "
                                f"{nbytes / median / 1e9:8.2f} {ratio:>9}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_sid_loss(benchmark, shape, dtype, provider):
    sid, _ = _fused(provider)
    (x, yr, yf), w = _inputs(shape, dtype, 3, (True, True, True))

    def step():
        total, _ = sid(x, yr, yf, w)
        grads = torch.autograd.grad(total, (x, yr, yf))
        _sync()
        return grads

    step()  # warm-up: compilation, autotuning, allocator
    benchmark.pedantic(step, rounds=20 if DEVICE.type == "cuda" else 5, iterations=1, warmup_rounds=2)
    _record(benchmark, "sid", provider, shape, dtype)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_edm_loss(benchmark, shape, dtype, provider):
    _, edm = _fused(provider)
    (d, t), w = _inputs(shape, dtype, 2, (True, False))

    def step():
        total, _ = edm(d, t, w)
        grads = torch.autograd.grad(total, (d,))
        _sync()
        return grads

    step()
    benchmark.pedantic(step, rounds=20 if DEVICE.type == "cuda" else 5, iterations=1, warmup_rounds=2)
    _record(benchmark, "edm", provider, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_copy_bandwidth(benchmark, shape, dtype):
    """The ceiling: a device-to-device copy of one input-sized buffer, GB/s = 2N bytes / time."""
    (src,), _ = _inputs(shape, dtype, 1, (False,))
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)
        _sync()

    benchmark.pedantic(step, rounds=50 if DEVICE.type == "cuda" else 10, iterations=1, warmup_rounds=2)
    _record(benchmark, "copy", "copy", shape, dtype)
