"""The CUDA C++ fused losses (csrc/, sfd_fast.core.cuda_ext) against the reference in sfd_fast.core.losses.

Three layers:
- CPU, always: cuda_ext imports, reports why it is unavailable, validates arguments.
- CI compile check (slow): every csrc/ source compiles with the machine's nvcc against torch's
  headers (-c only: a CPU torch has no CUDA libraries to link against).
- GPU (skipped without a CUDA device): kernels vs reference over odd shapes, batch 1,
  fp32/bf16/fp16, NaN/inf rows, every gradient, misaligned memory, determinism, opcheck,
  torch.compile(fullgraph=True), and the C++ argument checks.

Tolerances. Kernel and reference read the same (possibly low-precision) inputs and both
accumulate in fp32, so the forward differs only by summation order: |k - r| <= 5e-5 x the sum
of |terms| (fp32 rounding of ~N/(threads*splits) sequential adds). Gradients are computed in
fp32 and rounded once to the input dtype, so they may differ from the fp32 reference by one
rounding: rtol = the dtype's eps (twice the half-ulp bound, i.e. the "at most 2x plain
PyTorch's own low-precision error" rule), plus atol = 1e-5 x max|grad| for fp32 cancellation.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from sfd_fast.core import cuda_ext, losses

ALPHA, OMEGA_MIN = 1.2, 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# batch 1; odd sizes (no multiple of a 16-byte vector); 3-D input; a row split over many
# blocks (65536 elements); a large batch of tiny rows.
SHAPES = [(1, 3, 16, 16), (3, 1, 17, 19), (2, 3, 7), (5, 4, 32, 32), (1, 4, 128, 128), (300, 2, 3, 5)]

has_cuda = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")


# ---- CPU: loader and validation ------------------------------------------------------------

def test_available_returns_a_consistent_pair():
    ok, reason = cuda_ext.available()
    assert isinstance(ok, bool) and isinstance(reason, str)
    assert ok == (reason == "")


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_available_says_cpu_only_torch():
    ok, reason = cuda_ext.available()
    assert not ok
    assert "CPU-only" in reason and torch.__version__ in reason


def test_jit_build_can_be_disabled(monkeypatch):
    monkeypatch.setenv(cuda_ext.JIT_ENV, "0")
    assert "disabled" in cuda_ext._jit_build()


def test_available_compiles_without_graph_break():
    """The availability check is a trace-time constant: compiled callers (fullgraph) never
    trace the loader, whatever the answer is."""
    ok, _ = cuda_ext.available()

    def f(x):
        return x + 1 if cuda_ext.available()[0] else x - 1

    x = torch.zeros(2)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), x + (1 if ok else -1))


def _cpu_batch(shape=(2, 3, 4, 4), dtype=torch.float32):
    return torch.randn(shape).to(dtype)


BAD_INPUTS = [
    # (description, x_g, y_real, weight, message fragment)
    ("shape mismatch", _cpu_batch(), _cpu_batch((2, 3, 4, 5)), torch.ones(2), "shape"),
    ("empty batch", _cpu_batch((0, 3, 4, 4)), _cpu_batch((0, 3, 4, 4)), torch.ones(0), "non-empty batch"),
    ("1-D input", torch.randn(5), torch.randn(5), torch.ones(5), "at least 2 dims"),
    ("no elements per sample", _cpu_batch((2, 0)), _cpu_batch((2, 0)), torch.ones(2), "no elements"),
    ("float64", _cpu_batch(dtype=torch.float64), _cpu_batch(dtype=torch.float64), torch.ones(2), "allowed"),
    ("mixed dtypes", _cpu_batch(), _cpu_batch(dtype=torch.float16), torch.ones(2), "share one dtype"),
    ("non-contiguous", _cpu_batch().transpose(2, 3), _cpu_batch().transpose(2, 3), torch.ones(2), "contiguous"),
    ("weight shape", _cpu_batch(), _cpu_batch(), torch.ones(3), "weight must be a tensor of shape"),
    ("CPU tensors", _cpu_batch(), _cpu_batch(), torch.ones(2), "CUDA tensors"),
]


@pytest.mark.parametrize("what,x,y,w,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_named_in_the_error(what, x, y, w, match):
    with pytest.raises(ValueError, match=match):
        cuda_ext.sid_generator_loss(x, y, y, w, alpha=ALPHA)
    with pytest.raises(ValueError, match=match):
        cuda_ext.edm_denoising_loss(x, y, w)


# ---- CI: the CUDA sources compile ------------------------------------------------------------

def _nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc") if Path(p).exists()), None)


@pytest.mark.slow  # ~40-55 s of CPU per file with torch's headers; 1.5-4 min wall on the shared CI box
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (needs a CUDA toolkit)")
@pytest.mark.parametrize("source", sorted(p.name for p in (*cuda_ext.CSRC_DIR.glob("*.cu"),
                                                              *cuda_ext.CSRC_DIR.glob("*.cpp"))))
def test_source_compiles_with_nvcc(source, tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = list(include_paths())
    # A CPU torch wheel ships c10/cuda headers but not the generated config header they
    # include; supply the one line a CUDA build generates there. Unused on a CUDA torch.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        shim = tmp_path / "shim/c10/cuda/impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path / "shim"))
    cmd = [_nvcc(), "-c", str(cuda_ext.CSRC_DIR / source), "-o", str(tmp_path / "out.o"),
           "-std=c++20", "-arch=sm_90", *cuda_ext.NVCC_FLAGS, *COMMON_NVCC_FLAGS,  # as a real build
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DTORCH_EXTENSION_NAME=_C", f"-I{sysconfig.get_paths()['include']}",
           *(f"-I{p}" for p in includes)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    print(f"nvcc {source}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr[-4000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0


# ---- GPU: kernels against the reference --------------------------------------------------------

@pytest.fixture(scope="module")
def ext():
    ok, reason = cuda_ext.available()
    if not ok:  # loud on a GPU machine: a broken build must not hide behind skips
        pytest.fail(f"a CUDA device is present but the extension is unavailable: {reason}")
    return cuda_ext


def _images(shape, dtype, seed=0):
    """x_g, y_real, y_fake in `dtype` on the GPU, and a weight (B,) with distinct entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    yr = x + 0.5 * torch.randn(shape, generator=g)
    yf = yr + 0.2 * torch.randn(shape, generator=g)
    w = torch.rand(shape[0], generator=g) + 0.5
    return [t.to("cuda", dtype) for t in (x, yr, yf)], w.cuda()


def _leaves(ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in ts]


def _assert_grad_close(kernel, ref32, dtype, rows=slice(None)):
    k, r = kernel.float()[rows], ref32[rows]
    rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(k, r, rtol=rtol, atol=1e-5 * r.abs().max().item() + 1e-12)


def _sid_scale(x, yr, yf):
    """Per row: sum of |terms| / omega, the scale of the forward's summation error."""
    x, yr, yf = x.float(), yr.float(), yf.float()
    d, e = yr - yf, yr - x
    omega = e.abs().flatten(1).mean(1).clamp_min(OMEGA_MIN)
    return (d * (e - ALPHA * d)).abs().flatten(1).sum(1) / omega


def _assert_forward_close(kernel, ref, scale):
    assert kernel.dtype == torch.float32 and kernel.shape == ref.shape
    err = (kernel - ref).abs()
    assert bool((err <= 5e-5 * scale + 1e-6).all()), f"max err {err.max().item()} vs scale {scale.max().item()}"


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sid_loss_matches_reference(ext, shape, dtype):
    imgs, w = _images(shape, dtype)
    k_in, r_in = _leaves(imgs), _leaves(imgs, torch.float32)
    k_total, k_per = ext.sid_generator_loss(*k_in, w, alpha=ALPHA, omega_min=OMEGA_MIN)
    r_total, r_per = losses.sid_generator_loss(*r_in, w, alpha=ALPHA, omega_min=OMEGA_MIN)
    scale = _sid_scale(*imgs)
    _assert_forward_close(k_per, r_per.detach(), scale)
    _assert_forward_close(k_total, r_total.detach(), (w * scale).sum())
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        assert k.grad.dtype == dtype
        _assert_grad_close(k.grad, r.grad, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_edm_loss_matches_reference(ext, shape, dtype):
    (d, x, _), w = _images(shape, dtype)
    k_in, r_in = _leaves([d, x]), _leaves([d, x], torch.float32)
    k_total, k_per = ext.edm_denoising_loss(*k_in, w)
    r_total, r_per = losses.edm_denoising_loss(*r_in, w)
    scale = r_per.detach()  # all terms are >= 0: the sum is its own scale
    _assert_forward_close(k_per, r_per.detach(), scale)
    _assert_forward_close(k_total, r_total.detach(), (w * scale).sum())
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        _assert_grad_close(k.grad, r.grad, dtype)


def _poison(imgs):
    """Row 1: a NaN in x_g; row 2: an inf in y_fake. Rows 0 and 3 stay finite."""
    imgs = [t.clone() for t in imgs]
    imgs[0][1].view(-1)[5] = float("nan")
    imgs[2][2].view(-1)[0] = float("inf")
    return imgs


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sid_non_finite_rows_are_masked(ext, dtype):
    imgs, w = _images((4, 3, 9, 9), dtype)
    imgs = _poison(imgs)
    k_in, r_in = _leaves(imgs), _leaves(imgs, torch.float32)
    k_total, k_per = ext.sid_generator_loss(*k_in, w, alpha=ALPHA)
    r_total, r_per = losses.sid_generator_loss(*r_in, w, alpha=ALPHA)
    assert torch.equal(torch.isfinite(k_per), torch.isfinite(r_per))
    assert torch.equal(torch.isfinite(k_per).cpu(), torch.tensor([True, False, False, True]))
    assert torch.isfinite(k_total)
    good = [0, 3]
    _assert_forward_close(k_total, r_total.detach(), (w * _sid_scale(*imgs)).nan_to_num(0, 0, 0).sum())
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        assert torch.count_nonzero(k.grad[1:3]) == 0, "masked rows must get exact zero gradients"
        _assert_grad_close(k.grad, r.grad, dtype, rows=good)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edm_non_finite_rows_are_masked(ext, dtype):
    imgs, w = _images((4, 2, 5, 7), dtype)
    d, _, x = _poison(imgs)  # row 1 NaN in denoised, row 2 inf in target
    k_in, r_in = _leaves([d, x]), _leaves([d, x], torch.float32)
    k_total, k_per = ext.edm_denoising_loss(*k_in, w)
    r_total, r_per = losses.edm_denoising_loss(*r_in, w)
    assert torch.equal(torch.isfinite(k_per).cpu(), torch.tensor([True, False, False, True]))
    torch.testing.assert_close(k_total, r_total.detach(), rtol=5e-5, atol=0)
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        assert torch.count_nonzero(k.grad[1:3]) == 0
        _assert_grad_close(k.grad, r.grad, dtype, rows=[0, 3])


@needs_cuda
@pytest.mark.parametrize("kind", ["sid", "edm"])
def test_gradient_through_per_sample(ext, kind):
    """Upstream gradient on both outputs: 0.5 * total + sum(v * per_sample); also per_sample alone."""
    imgs, w = _images((3, 2, 11, 13), torch.float32)
    if kind == "edm":
        imgs = imgs[:2]
    v = torch.tensor([0.3, -1.0, 2.0], device="cuda")

    def run(fn, ins, use_total):
        total, per = fn(*ins, w, alpha=ALPHA) if kind == "sid" else fn(*ins, w)
        ((0.5 * total if use_total else 0) + (v * per).sum()).backward()
        return [t.grad for t in ins]

    kfn = ext.sid_generator_loss if kind == "sid" else ext.edm_denoising_loss
    rfn = losses.sid_generator_loss if kind == "sid" else losses.edm_denoising_loss
    for use_total in (True, False):
        for kg, rg in zip(run(kfn, _leaves(imgs), use_total), run(rfn, _leaves(imgs), use_total)):
            _assert_grad_close(kg, rg, torch.float32)


def _offset_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """Contiguous copy of t whose data starts `offset` elements into a fresh buffer."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    out = buf[offset:].view(t.shape)
    out.copy_(t)
    return out


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("offsets", [(1, 1, 1), (1, 0, 3)], ids=["same-misalignment", "mixed"])
def test_misaligned_inputs(ext, dtype, offsets):
    """Same offset mod 16 bytes: vector path with a scalar head per row; mixed: scalar path."""
    imgs, w = _images((3, 3, 10, 10), dtype)
    shifted = [_offset_copy(t, o) for t, o in zip(imgs, offsets)]
    assert shifted[0].data_ptr() % 16 != 0
    k_in, r_in = _leaves(shifted), _leaves(imgs, torch.float32)
    # detach/requires_grad_ keeps the storage offset, so the kernel really sees misaligned rows
    assert k_in[0].data_ptr() == shifted[0].data_ptr()
    k_total, k_per = ext.sid_generator_loss(*k_in, w, alpha=ALPHA)
    r_total, r_per = losses.sid_generator_loss(*r_in, w, alpha=ALPHA)
    _assert_forward_close(k_per, r_per.detach(), _sid_scale(*imgs))
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        _assert_grad_close(k.grad, r.grad, dtype)


@needs_cuda
def test_results_are_deterministic(ext):
    imgs, w = _images((2, 4, 64, 64), torch.bfloat16)
    runs = []
    for _ in range(2):
        ins = _leaves(imgs)
        total, per = ext.sid_generator_loss(*ins, w, alpha=ALPHA)
        total.backward()
        runs.append([total, per, *(t.grad for t in ins)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_cuda
def test_zero_weight_rows_get_zero_gradient(ext):
    imgs, w = _images((3, 2, 8, 8), torch.float32)
    w[1] = 0.0
    ins = _leaves(imgs)
    ext.sid_generator_loss(*ins, w, alpha=ALPHA)[0].backward()
    for t in ins:
        assert torch.count_nonzero(t.grad[1]) == 0 and torch.count_nonzero(t.grad[0]) > 0


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(ext, dtype):
    imgs, w = _images((2, 3, 5, 7), dtype)
    torch.library.opcheck(torch.ops.sfd_fast_C.sid_loss_fwd.default, (*_leaves(imgs), w, ALPHA, OMEGA_MIN))
    torch.library.opcheck(torch.ops.sfd_fast_C.edm_loss_fwd.default, (*_leaves(imgs[:2]), w))
    total, per, omega = torch.ops.sfd_fast_C.sid_loss_fwd(*imgs, w, ALPHA, OMEGA_MIN)
    g = torch.ones((), device="cuda")
    torch.library.opcheck(torch.ops.sfd_fast_C.sid_loss_bwd.default,
                          (g, None, *imgs, w, per, omega, ALPHA))
    _, per_e = torch.ops.sfd_fast_C.edm_loss_fwd(*imgs[:2], w)
    torch.library.opcheck(torch.ops.sfd_fast_C.edm_loss_bwd.default, (g, per_e, *imgs[:2], w, per_e))


@needs_cuda
def test_torch_compile_fullgraph_sees_one_op(ext):
    imgs, w = _images((2, 3, 8, 8), torch.float32)

    def step(x, yr, yf, d, t):
        sid, _ = ext.sid_generator_loss(x, yr, yf, w, alpha=ALPHA)
        edm, _ = ext.edm_denoising_loss(d, t, w)
        return sid + edm

    ins = [*imgs, imgs[1], imgs[0]]
    eager_in, compiled_in = _leaves(ins), _leaves(ins)
    step(*eager_in).backward()
    torch.compile(step, fullgraph=True)(*compiled_in).backward()
    for a, b in zip(eager_in, compiled_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


C_BAD = [
    ("dtype", lambda x, w: (x.double(), x.double(), x.double(), w), "allowed: Float"),
    ("shape", lambda x, w: (x, x[:, :2].contiguous(), x, w), "y_real has shape"),
    ("contiguous", lambda x, w: (x.transpose(2, 3), x.transpose(2, 3), x.transpose(2, 3), w), "contiguous"),
    ("mixed dtype", lambda x, w: (x, x.half(), x, w), "share one dtype"),
    ("weight device", lambda x, w: (x, x, x, w.cpu()), "weight is on cpu"),
    ("weight dtype", lambda x, w: (x, x, x, w.double()), "weight has dtype"),
    ("weight shape", lambda x, w: (x, x, x, w[:1]), r"weight must have shape \(B,\)"),
    ("empty batch", lambda x, w: (x[:0], x[:0], x[:0], w[:0]), "empty batch"),
    ("cpu", lambda x, w: (x.cpu(), x.cpu(), x.cpu(), w.cpu()), "must be a CUDA tensor"),
]


@needs_cuda
@pytest.mark.parametrize("what,make,match", C_BAD, ids=[c[0] for c in C_BAD])
def test_cpp_checks_name_the_bad_input(ext, what, make, match):
    x = torch.randn(2, 3, 4, 4, device="cuda")
    w = torch.ones(2, device="cuda")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sfd_fast_C.sid_loss_fwd(*make(x, w), ALPHA, OMEGA_MIN)
    with pytest.raises(RuntimeError, match=match.replace("y_real", "target")):
        args = make(x, w)
        torch.ops.sfd_fast_C.edm_loss_fwd(args[0], args[1], args[3])


@needs_cuda
def test_cpp_rejects_non_finite_alpha(ext):
    x = torch.randn(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="alpha must be a finite number"):
        torch.ops.sfd_fast_C.sid_loss_fwd(x, x, x, torch.ones(2, device="cuda"), float("nan"), OMEGA_MIN)


@needs_cuda
def test_python_api_rejects_mixed_devices(ext):
    x = torch.randn(2, 3, device="cuda")
    with pytest.raises(ValueError, match="on cpu"):
        ext.sid_generator_loss(x, x.cpu(), x, torch.ones(2, device="cuda"), alpha=ALPHA)
