"""The CUDA C++ fused losses (csrc/, sfd_fast.core.cuda_ext) against the reference in sfd_fast.core.losses.

Three layers:
- CPU, always: cuda_ext imports, reports why it is unavailable, validates arguments (layouts
  included). The kernels' arithmetic built for the CPU is tested in test_cuda_math_host.py.
- CI compile checks (slow): every csrc/ source compiles with the machine's nvcc against torch's
  headers (-c only: a CPU torch has no CUDA libraries to link against), and the sm_90 PTX of
  the backward kernels has one 128-bit store per gradient vector.
- GPU (skipped without a CUDA device): kernels vs reference over odd shapes, batch 1,
  fp32/bf16/fp16, channels_last, NaN/+-inf rows (with and without grad_per_sample), every
  gradient and its strides, need flags, misaligned memory, determinism, opcheck,
  torch.compile(fullgraph=True), and the C++ argument checks.

Tolerances: see tests/fused_loss_asserts.py (forward 5e-5 x sum of |terms|; gradients one
rounding to the input dtype, rtol = eps).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from fused_loss_asserts import (ALPHA, DTYPES, OMEGA_MIN, SHAPES, assert_forward_close, assert_grad_close,
                                images, leaves, poison, poison_rows, sid_scale)
from sfd_fast.core import cuda_ext, losses

has_cuda = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")
CL = torch.channels_last
LAYOUTS = [torch.contiguous_format, CL]
LAYOUT_IDS = ["contiguous", "channels_last"]


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
    # every other element: rows have gaps
    ("gappy rows", _cpu_batch((2, 3, 4, 8))[..., ::2], _cpu_batch((2, 3, 4, 8))[..., ::2], torch.ones(2),
     r"strides \(96, 32, 8, 2\)\) does not store each sample as one dense block"),
    # dense, but the batch dim is innermost: a sample is not one block
    ("batch not outermost", _cpu_batch((3, 4, 4, 2)).permute(3, 0, 1, 2),
     _cpu_batch((3, 4, 4, 2)).permute(3, 0, 1, 2), torch.ones(2), "one dense block"),
    ("mixed layouts", _cpu_batch(), _cpu_batch().contiguous(memory_format=CL), torch.ones(2),
     r"y_real has strides \(48, 1, 12, 3\) but x_g has \(48, 16, 4, 1\); all image inputs must share "
     r"one memory layout \(call \.contiguous\(\) or \.contiguous\(memory_format=torch\.channels_last\)"),
    ("weight shape", _cpu_batch(), _cpu_batch(), torch.ones(3), "weight must be a tensor of shape"),
    ("CPU tensors", _cpu_batch(), _cpu_batch(), torch.ones(2), "CUDA tensors"),
]


@pytest.mark.parametrize("what,x,y,w,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_named_in_the_error(what, x, y, w, match):
    with pytest.raises(ValueError, match=match.replace("y_real", "y_real|y_fake")):
        cuda_ext.sid_generator_loss(x, y, y, w, alpha=ALPHA)
    with pytest.raises(ValueError, match=match.replace("y_real", "target").replace("x_g", "denoised")):
        cuda_ext.edm_denoising_loss(x, y, w)


DENSE_LAYOUTS = [
    ("channels_last 3ch", lambda: _cpu_batch((2, 3, 5, 7)).contiguous(memory_format=CL)),
    ("channels_last 4ch", lambda: _cpu_batch((3, 4, 8, 8)).contiguous(memory_format=CL)),
    ("H/W transposed", lambda: _cpu_batch((2, 3, 4, 6)).transpose(2, 3)),
    ("batch 1, H/W transposed", lambda: _cpu_batch((1, 3, 6, 4)).transpose(2, 3)),
]


@pytest.mark.parametrize("what,make", DENSE_LAYOUTS, ids=[d[0] for d in DENSE_LAYOUTS])
def test_dense_row_layouts_pass_the_python_check(what, make, monkeypatch):
    """Layouts whose rows are dense blocks pass validation; the first error is the device one,
    and past the device check (patched out) the loader's 'unavailable' one."""
    x = make()
    assert not x.is_contiguous()
    cuda_ext._check_images((x, "x_g"), (x.clone(), "y_real"), (x.clone(), "y_fake"))  # clone keeps strides
    with pytest.raises(ValueError, match="the CUDA kernels need CUDA tensors"):
        cuda_ext.sid_generator_loss(x, x, x, torch.ones(x.shape[0]), alpha=ALPHA)
    if cuda_ext.available()[0]:
        return  # a GPU machine: the C++ op would now reject the CPU tensors instead
    monkeypatch.setattr(cuda_ext, "_check_devices", lambda *named: None)
    with pytest.raises(RuntimeError, match="the CUDA loss kernels are unavailable"):
        cuda_ext.sid_generator_loss(x, x, x, torch.ones(x.shape[0]), alpha=ALPHA)
    with pytest.raises(RuntimeError, match="the CUDA loss kernels are unavailable"):
        cuda_ext.edm_denoising_loss(x, x, torch.ones(x.shape[0]))


# ---- CI: the CUDA sources compile ------------------------------------------------------------

def _nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc") if Path(p).exists()), None)


def _nvcc_command(mode: str, source: Path, out: Path, tmp_path: Path) -> list[str]:
    """nvcc `mode` ("-c" or "-ptx") of one csrc/ file for sm_90 with a real build's flags."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = list(include_paths())
    # A CPU torch wheel ships c10/cuda headers but not the generated config header they
    # include; supply the one line a CUDA build generates there. Unused on a CUDA torch.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        shim = tmp_path / "shim/c10/cuda/impl"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path / "shim"))
    return [_nvcc(), mode, str(source), "-o", str(out),
            "-std=c++20", "-arch=sm_90", *cuda_ext.NVCC_FLAGS, *COMMON_NVCC_FLAGS,  # as a real build
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-DTORCH_EXTENSION_NAME=_C", f"-I{sysconfig.get_paths()['include']}",
            *(f"-I{p}" for p in includes)]


def _run_nvcc(cmd: list[str], what: str) -> None:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    print(f"nvcc {what}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    assert proc.returncode == 0, f"nvcc failed on {what}:\n{proc.stderr[-4000:]}"


@pytest.mark.slow  # ~40-80 s of CPU per file with torch's headers; 1.5-4 min wall on the shared CI box
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (needs a CUDA toolkit)")
@pytest.mark.parametrize("source", sorted(p.name for p in (*cuda_ext.CSRC_DIR.glob("*.cu"),
                                                              *cuda_ext.CSRC_DIR.glob("*.cpp"))))
def test_source_compiles_with_nvcc(source, tmp_path):
    _run_nvcc(_nvcc_command("-c", cuda_ext.CSRC_DIR / source, tmp_path / "out.o", tmp_path), source)
    assert (tmp_path / "out.o").stat().st_size > 0


# Mangled kernel names: row_grads<T, Op, kVec> / row_partial_sums<T, Op, kVec>.
_KERNEL = re.compile(r"(row_grads|row_partial_sums)I(f|N3c104HalfE|N3c108BFloat16E)N\S*?"
                     r"(SidBwd|EdmBwd|SidFwd|EdmFwd)ELb([01])E")
_ENTRY = re.compile(r"^(?:\.visible\s+|\.weak\s+)?\.entry\s+(\S+?)\(", re.M)


def _ptx_kernels(ptx: str) -> dict[tuple[str, str, str, bool], str]:
    """(kernel, dtype token, op, kVec) -> the PTX text of that entry."""
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(ptx)] + [(len(ptx), "")]
    out = {}
    for (a, name), (b, _) in zip(starts, starts[1:]):
        m = _KERNEL.search(name)
        if m:
            out[(m.group(1), m.group(2), m.group(3), m.group(4) == "1")] = ptx[a:b]
    return out


def _global_accesses(body: str, op: str) -> collections.Counter:
    """Counter of (vector lanes, bits per lane, is .nc) over the `op` ("st" or "ld") instructions
    to global memory, e.g. st.global.v4.b32 -> (4, 32, False)."""
    found = collections.Counter()
    for mods in re.findall(rf"\b{op}\.global((?:\.[\w:]+)+)\s", body):
        parts = mods.strip(".").split(".")
        lanes = 4 if "v4" in parts else 2 if "v2" in parts else 1
        found[(lanes, int(re.sub(r"\D", "", parts[-1])), "nc" in parts)] += 1
    return found


def _check_vector_accesses(ptx: str) -> list[str]:
    """Problems in the 16-byte vector instantiations (kVec = true) of both kernels: each gradient
    vector must be one 128-bit store, each input vector one 128-bit read-only (.nc) load; the only
    other stores allowed are the kOut single-element head and tail stores."""
    kernels = _ptx_kernels(ptx)
    problems = []
    for dtype, elem_bits in (("f", 32), ("N3c104HalfE", 16), ("N3c108BFloat16E", 16)):
        for op, n_in, n_out in (("Sid", 3, 3), ("Edm", 2, 2)):
            bwd = kernels.get(("row_grads", dtype, f"{op}Bwd", True))
            fwd = kernels.get(("row_partial_sums", dtype, f"{op}Fwd", True))
            if bwd is None or fwd is None:
                problems.append(f"{op} {dtype}: vector kernels not found in the PTX")
                continue
            st, ld_b, ld_f = _global_accesses(bwd, "st"), _global_accesses(bwd, "ld"), _global_accesses(fwd, "ld")
            name = f"row_grads<{dtype}, {op}Bwd, true>"
            wide = sum(c for (lanes, bits, _), c in st.items() if lanes * bits == 128)
            scalar = sum(c for (lanes, bits, _), c in st.items() if (lanes, bits) == (1, elem_bits))
            other = {k: c for k, c in st.items() if k[0] * k[1] != 128 and k[:2] != (1, elem_bits)}
            if wide < n_out:
                problems.append(f"{name}: {wide} 128-bit stores, want >= {n_out}; stores {dict(st)}")
            if scalar > 2 * n_out or other:
                problems.append(f"{name}: {scalar} single-element stores (want <= {2 * n_out}: head + tail), "
                                f"other widths {other}; stores {dict(st)}")
            for kname, ld in ((name, ld_b), (f"row_partial_sums<{dtype}, {op}Fwd, true>", ld_f)):
                nc128 = sum(c for (lanes, bits, nc), c in ld.items() if lanes * bits == 128 and nc)
                narrow_vec = {k: c for k, c in ld.items() if k[0] > 1 and k[0] * k[1] != 128}
                if nc128 < n_in or narrow_vec:
                    problems.append(f"{kname}: {nc128} ld.global.nc 128-bit loads (want >= {n_in}), "
                                    f"loads {dict(ld)}")
    return problems


@pytest.mark.slow  # one nvcc -ptx of fused_losses.cu: ~15-50 s on the 2-core box
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (needs a CUDA toolkit)")
def test_row_grads_stores_are_128_bit(tmp_path):
    """The bf16/fp16/fp32 vector paths move 16 bytes per instruction. The first version stored
    each 16-byte vector as 2 x u16 + 3 x v2.u16 (bf16/fp16) or f32 + f32 + v2.f32 (fp32), and
    loaded it without .nc; this test failed on it."""
    out = tmp_path / "fused_losses.ptx"
    _run_nvcc(_nvcc_command("-ptx", cuda_ext.CSRC_DIR / "fused_losses.cu", out, tmp_path), "fused_losses.cu -ptx")
    problems = _check_vector_accesses(out.read_text())
    assert not problems, "\n".join(problems)


# ---- GPU: kernels against the reference --------------------------------------------------------

@pytest.fixture(scope="module")
def ext():
    ok, reason = cuda_ext.available()
    if not ok:  # loud on a GPU machine: a broken build must not hide behind skips
        pytest.fail(f"a CUDA device is present but the extension is unavailable: {reason}")
    return cuda_ext


def _loss(module, kind, ins, w):
    if kind == "sid":
        return module.sid_generator_loss(*ins, w, alpha=ALPHA, omega_min=OMEGA_MIN)
    return module.edm_denoising_loss(*ins, w)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sid_loss_matches_reference(ext, shape, dtype):
    imgs, w = images(shape, dtype)
    k_in, r_in = leaves(imgs), leaves(imgs, torch.float32)
    k_total, k_per = ext.sid_generator_loss(*k_in, w, alpha=ALPHA, omega_min=OMEGA_MIN)
    r_total, r_per = losses.sid_generator_loss(*r_in, w, alpha=ALPHA, omega_min=OMEGA_MIN)
    scale = sid_scale(*imgs)
    assert_forward_close(k_per, r_per.detach(), scale)
    assert_forward_close(k_total, r_total.detach(), (w * scale).sum())
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        assert k.grad.dtype == dtype
        assert_grad_close(k.grad, r.grad, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_edm_loss_matches_reference(ext, shape, dtype):
    (d, x, _), w = images(shape, dtype)
    k_in, r_in = leaves([d, x]), leaves([d, x], torch.float32)
    k_total, k_per = ext.edm_denoising_loss(*k_in, w)
    r_total, r_per = losses.edm_denoising_loss(*r_in, w)
    scale = r_per.detach()  # all terms are >= 0: the sum is its own scale
    assert_forward_close(k_per, r_per.detach(), scale)
    assert_forward_close(k_total, r_total.detach(), (w * scale).sum())
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        assert_grad_close(k.grad, r.grad, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 3, 9, 11), (2, 4, 16, 16), (1, 4, 33, 7)], ids=str)
@pytest.mark.parametrize("kind", ["sid", "edm"])
def test_channels_last_matches_reference(ext, kind, shape, dtype):
    """A channels_last UNet output (the `fast` preset, issue 14): values and gradients as the
    reference, gradients in the inputs' strides."""
    imgs, w = images(shape, dtype, memory_format=CL)
    imgs = imgs if kind == "sid" else imgs[:2]
    assert not imgs[0].is_contiguous()
    k_in, r_in = leaves(imgs), leaves(imgs, torch.float32)
    k_total, k_per = _loss(ext, kind, k_in, w)
    r_total, r_per = _loss(losses, kind, r_in, w)
    scale = sid_scale(*imgs) if kind == "sid" else r_per.detach()
    assert_forward_close(k_per, r_per.detach(), scale)
    assert_forward_close(k_total, r_total.detach(), (w * scale).sum())
    # autograd.grad hands back the op's own tensors (a leaf's .grad may be re-strided)
    k_grads = torch.autograd.grad(k_total, k_in)
    r_grads = torch.autograd.grad(r_total, r_in)
    for t, k, r in zip(k_in, k_grads, r_grads):
        assert k.stride() == t.stride() and k.dtype == dtype
        assert_grad_close(k, r, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sid_non_finite_rows_are_masked(ext, dtype):
    imgs, w = images((4, 3, 9, 9), dtype)
    imgs = poison(imgs)
    k_in, r_in = leaves(imgs), leaves(imgs, torch.float32)
    k_total, k_per = ext.sid_generator_loss(*k_in, w, alpha=ALPHA)
    r_total, r_per = losses.sid_generator_loss(*r_in, w, alpha=ALPHA)
    assert torch.equal(torch.isfinite(k_per), torch.isfinite(r_per))
    assert torch.equal(torch.isfinite(k_per).cpu(), torch.tensor([True, False, False, True]))
    assert torch.isfinite(k_total)
    good = [0, 3]
    assert_forward_close(k_total, r_total.detach(), (w * sid_scale(*imgs)).nan_to_num(0, 0, 0).sum())
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        assert torch.count_nonzero(k.grad[1:3]) == 0, "masked rows must get exact zero gradients"
        assert_grad_close(k.grad, r.grad, dtype, rows=good)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edm_non_finite_rows_are_masked(ext, dtype):
    imgs, w = images((4, 2, 5, 7), dtype)
    d, _, x = poison(imgs)  # row 1 NaN in denoised, row 2 inf in target
    k_in, r_in = leaves([d, x]), leaves([d, x], torch.float32)
    k_total, k_per = ext.edm_denoising_loss(*k_in, w)
    r_total, r_per = losses.edm_denoising_loss(*r_in, w)
    assert torch.equal(torch.isfinite(k_per).cpu(), torch.tensor([True, False, False, True]))
    torch.testing.assert_close(k_total, r_total.detach(), rtol=5e-5, atol=0)
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        assert torch.count_nonzero(k.grad[1:3]) == 0
        assert_grad_close(k.grad, r.grad, dtype, rows=[0, 3])


# Row 1: NaN (SiD: omega NaN too), row 2: +inf, row 3: -inf; rows 0 and 4 stay finite.
BAD_ROWS = {"sid": {1: (0, 3, float("nan")), 2: (1, 0, float("inf")), 3: (2, 7, float("-inf"))},
            "edm": {1: (0, 3, float("nan")), 2: (1, 0, float("inf")), 3: (0, 7, float("-inf"))}}


@needs_cuda
@pytest.mark.parametrize("memory_format", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind", ["sid", "edm"])
def test_masked_rows_get_zero_gradient_with_grad_per_sample(ext, kind, memory_format):
    """An upstream gradient on per_sample must not reach a masked row either (its coefficient is
    g_total * w + g_per_sample; the mask applies to the sum)."""
    imgs, w = images((5, 3, 6, 7), torch.float32, memory_format=memory_format)
    imgs = poison_rows(imgs if kind == "sid" else imgs[:2], BAD_ROWS[kind])
    v = torch.tensor([0.3, -1.0, 2.0, 0.7, 1.5], device="cuda")
    k_in, r_in = leaves(imgs), leaves(imgs)
    k_total, k_per = _loss(ext, kind, k_in, w)
    r_total, r_per = _loss(losses, kind, r_in, w)
    assert torch.equal(torch.isfinite(k_per).cpu(), torch.tensor([True, False, False, False, True]))
    scale = sid_scale(*imgs) if kind == "sid" else r_per.detach()
    assert_forward_close(k_total, r_total.detach(), (w * scale).nan_to_num(0, 0, 0).sum())
    torch.autograd.backward([k_total, k_per], [torch.tensor(0.5, device="cuda"), v])
    torch.autograd.backward([r_total, r_per], [torch.tensor(0.5, device="cuda"), v])
    for k, r in zip(k_in, r_in):
        assert torch.count_nonzero(k.grad[1:4]) == 0, "masked rows must get exact zero gradients"
        assert_grad_close(k.grad, r.grad, torch.float32, rows=[0, 4])


@needs_cuda
@pytest.mark.parametrize("kind", ["sid", "edm"])
def test_gradient_through_per_sample(ext, kind):
    """Upstream gradient on both outputs: 0.5 * total + sum(v * per_sample); also per_sample alone."""
    imgs, w = images((3, 2, 11, 13), torch.float32)
    if kind == "edm":
        imgs = imgs[:2]
    v = torch.tensor([0.3, -1.0, 2.0], device="cuda")

    def run(module, ins, use_total):
        total, per = _loss(module, kind, ins, w)
        ((0.5 * total if use_total else 0) + (v * per).sum()).backward()
        return [t.grad for t in ins]

    for use_total in (True, False):
        for kg, rg in zip(run(ext, leaves(imgs), use_total), run(losses, leaves(imgs), use_total)):
            assert_grad_close(kg, rg, torch.float32)


NEEDS_SID = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
             (False, True, True)]


@needs_cuda
@pytest.mark.parametrize("need", NEEDS_SID, ids=lambda n: "".join("xrf"[i] for i in range(3) if n[i]))
def test_sid_computes_only_the_needed_gradients(ext, need):
    imgs, w = images((3, 3, 10, 10), torch.bfloat16, memory_format=CL)
    full = leaves(imgs)
    ext.sid_generator_loss(*full, w, alpha=ALPHA)[0].backward()
    part = [t.detach().clone().requires_grad_(n) for t, n in zip(imgs, need)]
    ext.sid_generator_loss(*part, w, alpha=ALPHA)[0].backward()
    for t, f, n in zip(part, full, need):
        assert (t.grad is not None) == n
        if n:  # the same kernel with fewer stores: bitwise equal
            assert torch.equal(t.grad, f.grad)
    # the op: an unneeded gradient is an empty (0,) tensor, never allocated at full size
    _, per, omega = torch.ops.sfd_fast_C.sid_loss_fwd(*imgs, w, ALPHA, OMEGA_MIN)
    g = torch.ones((), device="cuda")
    for flags in (need, (False, False, False)):
        outs = torch.ops.sfd_fast_C.sid_loss_bwd(g, None, *imgs, w, per, omega, ALPHA, *flags)
        for o, f, t, n in zip(outs, full, imgs, flags):
            if n:
                assert o.stride() == t.stride() and torch.equal(o, f.grad)
            else:
                assert o.shape == (0,) and o.dtype == t.dtype


@needs_cuda
@pytest.mark.parametrize("need", [(True, False), (False, True), (True, True)], ids=["D", "target", "both"])
def test_edm_computes_only_the_needed_gradients(ext, need):
    """The fake-score step (target x_g detached) needs dD alone: dtarget is never written."""
    (d, x, _), w = images((4, 3, 12, 12), torch.float16, memory_format=CL)
    full = leaves([d, x])
    ext.edm_denoising_loss(*full, w)[0].backward()
    part = [t.detach().clone().requires_grad_(n) for t, n in zip((d, x), need)]
    ext.edm_denoising_loss(*part, w)[0].backward()
    for t, f, n in zip(part, full, need):
        assert (t.grad is not None) == n
        if n:
            assert torch.equal(t.grad, f.grad)
    _, per = torch.ops.sfd_fast_C.edm_loss_fwd(d, x, w)
    outs = torch.ops.sfd_fast_C.edm_loss_bwd(torch.ones((), device="cuda"), None, d, x, w, per, *need)
    for o, f, t, n in zip(outs, full, (d, x), need):
        assert (o.stride() == t.stride() and torch.equal(o, f.grad)) if n else o.shape == (0,)


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
    imgs, w = images((3, 3, 10, 10), dtype)
    shifted = [_offset_copy(t, o) for t, o in zip(imgs, offsets)]
    assert shifted[0].data_ptr() % 16 != 0
    k_in, r_in = leaves(shifted), leaves(imgs, torch.float32)
    # detach/requires_grad_ keeps the storage offset, so the kernel really sees misaligned rows
    assert k_in[0].data_ptr() == shifted[0].data_ptr()
    k_total, k_per = ext.sid_generator_loss(*k_in, w, alpha=ALPHA)
    r_total, r_per = losses.sid_generator_loss(*r_in, w, alpha=ALPHA)
    assert_forward_close(k_per, r_per.detach(), sid_scale(*imgs))
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        assert_grad_close(k.grad, r.grad, dtype)


@needs_cuda
def test_results_are_deterministic(ext):
    imgs, w = images((2, 4, 64, 64), torch.bfloat16)
    runs = []
    for _ in range(2):
        ins = leaves(imgs)
        total, per = ext.sid_generator_loss(*ins, w, alpha=ALPHA)
        total.backward()
        runs.append([total, per, *(t.grad for t in ins)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_cuda
def test_zero_weight_rows_get_zero_gradient(ext):
    imgs, w = images((3, 2, 8, 8), torch.float32)
    w[1] = 0.0
    ins = leaves(imgs)
    ext.sid_generator_loss(*ins, w, alpha=ALPHA)[0].backward()
    for t in ins:
        assert torch.count_nonzero(t.grad[1]) == 0 and torch.count_nonzero(t.grad[0]) > 0


@needs_cuda
@pytest.mark.parametrize("memory_format", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(ext, dtype, memory_format):
    imgs, w = images((2, 3, 5, 7), dtype, memory_format=memory_format)
    torch.library.opcheck(torch.ops.sfd_fast_C.sid_loss_fwd.default, (*leaves(imgs), w, ALPHA, OMEGA_MIN))
    torch.library.opcheck(torch.ops.sfd_fast_C.edm_loss_fwd.default, (*leaves(imgs[:2]), w))
    # the fake-score step: only denoised requires grad
    torch.library.opcheck(torch.ops.sfd_fast_C.edm_loss_fwd.default, (leaves(imgs[:1])[0], imgs[1], w))
    total, per, omega = torch.ops.sfd_fast_C.sid_loss_fwd(*imgs, w, ALPHA, OMEGA_MIN)
    g = torch.ones((), device="cuda")
    for need in ((True, True, True), (True, False, True), (False, False, False)):
        torch.library.opcheck(torch.ops.sfd_fast_C.sid_loss_bwd.default,
                              (g, None, *imgs, w, per, omega, ALPHA, *need))
    _, per_e = torch.ops.sfd_fast_C.edm_loss_fwd(*imgs[:2], w)
    for need in ((True, True), (True, False)):
        torch.library.opcheck(torch.ops.sfd_fast_C.edm_loss_bwd.default, (g, per_e, *imgs[:2], w, per_e, *need))


@needs_cuda
@pytest.mark.parametrize("memory_format", LAYOUTS, ids=LAYOUT_IDS)
def test_torch_compile_fullgraph_sees_one_op(ext, memory_format):
    imgs, w = images((2, 3, 8, 8), torch.float32, memory_format=memory_format)

    def step(x, yr, yf, d, t):
        sid, _ = ext.sid_generator_loss(x, yr, yf, w, alpha=ALPHA)
        edm, _ = ext.edm_denoising_loss(d, t.detach(), w)  # the fake-score step's detached target
        return sid + edm

    ins = [*imgs, imgs[1], imgs[0]]
    eager_in, compiled_in = leaves(ins), leaves(ins)
    step(*eager_in).backward()
    torch.compile(step, fullgraph=True)(*compiled_in).backward()
    assert eager_in[4].grad is None and compiled_in[4].grad is None  # the detached target
    for a, b in zip(eager_in[:4], compiled_in[:4]):
        assert b.grad.stride() == a.grad.stride()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


C_BAD = [
    ("dtype", lambda x, w: (x.double(), x.double(), x.double(), w), "allowed: Float"),
    ("shape", lambda x, w: (x, x[:, :2].contiguous(), x, w), "y_real has shape"),
    ("gappy rows", lambda x, w: (x[..., ::2], x[..., ::2], x[..., ::2], w),
     r"x_g \(shape \[2, 3, 4, 2\], strides \[48, 16, 4, 2\]\) does not store each sample as one dense block"),
    ("mixed layouts", lambda x, w: (x, x.contiguous(memory_format=CL), x, w),
     r"y_real has strides \[48, 1, 12, 3\] but x_g has \[48, 16, 4, 1\]; all image inputs must share one "
     r"memory layout \(call \.contiguous\(\) or \.contiguous\(memory_format=torch\.channels_last\)"),
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
    with pytest.raises(RuntimeError, match=match.replace("y_real", "target").replace("x_g", "denoised")):
        args = make(x, w)
        torch.ops.sfd_fast_C.edm_loss_fwd(args[0], args[1], args[3])


@needs_cuda
def test_cpp_accepts_channels_last_and_rejects_mixed_layouts_in_backward(ext):
    imgs, w = images((2, 3, 4, 4), torch.float32, memory_format=CL)
    _, per, omega = torch.ops.sfd_fast_C.sid_loss_fwd(*imgs, w, ALPHA, OMEGA_MIN)
    g = torch.ones((), device="cuda")
    mixed = [imgs[0], imgs[1].contiguous(), imgs[2]]
    with pytest.raises(RuntimeError, match="y_real has strides .* must share one memory layout"):
        torch.ops.sfd_fast_C.sid_loss_bwd(g, None, *mixed, w, per, omega, ALPHA, True, True, True)
    with pytest.raises(RuntimeError, match="target has strides .* must share one memory layout"):
        torch.ops.sfd_fast_C.edm_loss_bwd(g, None, *mixed[:2], w, per, True, False)


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
