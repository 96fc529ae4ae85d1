"""Triton fused losses vs the references in sfd_fast.core.losses (CPU: the Triton interpreter).

Tolerance rule (flash-attention's): on each output and gradient, the kernel's max error against
the fp32 reference (run on the same, already-rounded inputs), relative to the reference's max
magnitude, is at most 2x the error of plain PyTorch evaluating the same formula in the input
dtype, and never required below 1e-5 (fp32 reductions in a different order: ~sqrt(N) eps).
Under the interpreter only, bf16 gradients may also be off by one bf16 ulp (2^-7 relative): the
interpreter converts fp32 -> bf16 by truncation (round-to-nearest-even on a GPU), which can
exceed 2x plain PyTorch's error for formulas as short as the EDM gradient.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton kernels: triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install sfd_fast[triton])")

from sfd_fast.kernels import INTERPRETED, edm_denoising_loss, edm_precond_denoising_loss, sid_generator_loss  # noqa: E402
from sfd_fast.kernels.edm_loss import edm_loss_op, edm_precond_loss_op  # noqa: E402
from sfd_fast.kernels.sid_loss import sid_loss_op  # noqa: E402

from sfd_fast.core import dispatch, losses  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not INTERPRETED:
    pytest.skip("sfd_fast.kernels was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)

ALPHA, OMEGA_MIN = 1.2, 1e-5
FLOOR = 1e-5
# (shape, block, chunk): batch 1; N not a multiple of the block; several chunks per row.
CASES = [((1, 3, 5, 7), 0, 0), ((4, 1, 16, 16), 0, 0), ((3, 3, 17, 19), 0, 0), ((2, 4, 33), 32, 64),
         ((5, 2, 9, 9), 16, 48)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sid_inputs(shape, dtype, seed=0):
    """x_g, y_r close to x_g, y_f close to y_r (as in training), rounded to ``dtype``; weight (B,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    yr = x + 0.5 * torch.randn(shape, generator=g)
    yf = yr + 0.2 * torch.randn(shape, generator=g)
    w = torch.rand(shape[0], generator=g) + 0.1
    return [t.to(DEVICE, dtype) for t in (x, yr, yf)], w.to(DEVICE)


def naive_sid(x, yr, yf, w):
    """The reference formula evaluated in the inputs' own dtype: plain PyTorch in low precision."""
    omega = (x - yr).abs().flatten(1).mean(1).clamp_min(OMEGA_MIN).detach()
    d = yr - yf
    per_sample = (d * ((yr - x) - ALPHA * d)).flatten(1).sum(1) / omega
    return (per_sample * w.to(x.dtype)).sum(), per_sample


def naive_edm(a, t, w):
    per_sample = (a - t).square().flatten(1).sum(1)
    return (per_sample * w.to(a.dtype)).sum(), per_sample


def run(fn, inputs, w, grad_ps):
    """Forward + backward of total + <grad_ps, per_sample>; returns (total, per_sample, grads)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    total, per_sample = fn(*leaves, w)
    (total + (per_sample * grad_ps.to(per_sample.dtype)).sum()).backward()
    return total.detach(), per_sample.detach(), [t.grad for t in leaves]


def rel_err(value, ref):
    return ((value.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_against_reference(kernel_fn, ref_fn, naive_fn, inputs, w):
    grad_ps = torch.rand(w.shape, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    truncation = 2.0 ** -7 if INTERPRETED and inputs[0].dtype == torch.bfloat16 else 0.0
    k = run(kernel_fn, inputs, w, grad_ps)
    ref = run(ref_fn, [t.float() for t in inputs], w, grad_ps)
    lowp = run(naive_fn, inputs, w, grad_ps)
    names = ["total", "per_sample"] + [f"grad[{i}]" for i in range(len(inputs))]
    for name, kv, rv, lv in zip(names, [k[0], k[1], *k[2]], [ref[0], ref[1], *ref[2]], [lowp[0], lowp[1], *lowp[2]]):
        bound = max(2 * rel_err(lv, rv), FLOOR, truncation if name.startswith("grad") else 0.0)
        assert rel_err(kv, rv) <= bound, f"{name}: kernel error {rel_err(kv, rv):.3g} > bound {bound:.3g}"
    for kg, x in zip(k[2], inputs):
        assert kg.dtype == x.dtype and kg.shape == x.shape
    assert k[0].dtype == torch.float32 and k[1].dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block,chunk", CASES)
def test_sid_loss_matches_reference(shape, block, chunk, dtype):
    inputs, w = sid_inputs(shape, dtype, seed=hash((shape, str(dtype))) % 1000)

    def kernel(x, yr, yf, w):
        total, per_sample, _ = sid_loss_op(x, yr, yf, w, ALPHA, OMEGA_MIN, block, chunk)
        return total, per_sample

    def ref(x, yr, yf, w):
        return losses.sid_generator_loss(x, yr, yf, w, alpha=ALPHA, omega_min=OMEGA_MIN)

    check_against_reference(kernel, ref, naive_sid, inputs, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block,chunk", CASES)
def test_edm_loss_matches_reference(shape, block, chunk, dtype):
    (a, t, _), w = sid_inputs(shape, dtype, seed=7)
    check_against_reference(lambda a, t, w: edm_loss_op(a, t, w, block, chunk), losses.edm_denoising_loss,
                            naive_edm, [a, t], w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,block,chunk", CASES[1:4])
def test_edm_precond_loss_matches_unfused(shape, block, chunk, dtype):
    (f, x, t), w = sid_inputs(shape, dtype, seed=3)
    c_skip = torch.rand(shape[0], *[1] * (len(shape) - 1), device=DEVICE)  # broadcastable, as network_output gives
    c_out = torch.rand_like(c_skip) + 0.1

    def kernel(f, x, t, w):
        return edm_precond_loss_op(f, x, c_skip, c_out, t, w, block, chunk)

    def ref(f, x, t, w):
        return losses.edm_denoising_loss(c_skip * x.float() + c_out * f.float(), t, w)

    def naive(f, x, t, w):
        return naive_edm(c_skip.to(f.dtype) * x + c_out.to(f.dtype) * f, t, w)

    check_against_reference(kernel, ref, naive, [f, x, t], w)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN rows
def test_nan_rows_are_masked_with_zero_gradients():
    (x, yr, yf), w = sid_inputs((5, 2, 6, 6), torch.float32, seed=1)
    yf[1, 0, 2, 3] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    yr[4, 1, 3, 3] = float("nan")  # omega NaN: a scale of 0 / NaN once leaked NaN gradients here
    for kernel_fn, ref_fn, inputs in [
        (sid_generator_loss, lambda *a: losses.sid_generator_loss(*a, alpha=ALPHA, omega_min=OMEGA_MIN), [x, yr, yf]),
        (edm_denoising_loss, losses.edm_denoising_loss, [yf, x]),
    ]:
        if kernel_fn is sid_generator_loss:
            kernel_fn = lambda *a: sid_generator_loss(*a, alpha=ALPHA, omega_min=OMEGA_MIN)  # noqa: E731
        grad_ps = torch.zeros_like(w)
        kt, kp, kg = run(kernel_fn, inputs, w, grad_ps)
        rt, rp, rg = run(ref_fn, inputs, w, grad_ps)
        bad = ~torch.isfinite(rp)
        assert bad.tolist() == [False, True, True, False, kernel_fn is not edm_denoising_loss]
        assert torch.equal(~torch.isfinite(kp), bad)
        assert torch.isfinite(kt) and torch.allclose(kt, rt, rtol=1e-5, atol=1e-5)
        for k, r in zip(kg, rg):
            assert torch.equal(k[bad], torch.zeros_like(k[bad])), "masked rows must get exactly zero gradient"
            assert torch.equal(r[bad], torch.zeros_like(r[bad])), "the reference too"
            torch.testing.assert_close(k[~bad], r[~bad], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 8, 8), (3, 4, 9, 6)])
def test_channels_last_matches_reference(shape, dtype):
    """NHWC inputs (the fast preset's UNet outputs for C > 1): same values, gradients in the inputs' layout."""
    (x, yr, yf), w = sid_inputs(shape, dtype, seed=7)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, yr, yf)]
    assert not cl[0].is_contiguous()
    sid = lambda *a: sid_generator_loss(*a, alpha=ALPHA, omega_min=OMEGA_MIN)  # noqa: E731
    sid_ref = lambda *a: losses.sid_generator_loss(*a, alpha=ALPHA, omega_min=OMEGA_MIN)  # noqa: E731
    check_against_reference(sid, sid_ref, naive_sid, cl, w)
    check_against_reference(edm_denoising_loss, losses.edm_denoising_loss, naive_edm, cl[:2], w)
    grad_ps = torch.zeros_like(w)
    for fn, inputs in [(sid, cl), (edm_denoising_loss, cl[:2])]:
        _, _, grads = run(fn, inputs, w, grad_ps)
        assert all(g.stride() == t.stride() for g, t in zip(grads, inputs))


def test_weight_gradient_and_unneeded_grads():
    (x, yr, yf), w = sid_inputs((3, 2, 5, 5), torch.float32, seed=2)
    wk = w.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    sid_generator_loss(x, yr, yf, wk, alpha=ALPHA)[0].backward()
    losses.sid_generator_loss(x, yr, yf, wr, alpha=ALPHA)[0].backward()
    torch.testing.assert_close(wk.grad, wr.grad, rtol=1e-5, atol=1e-5)
    # Only y_real needs a gradient: the others stay None (never written by the kernel).
    yr_leaf = yr.clone().requires_grad_(True)
    sid_generator_loss(x, yr_leaf, yf, w, alpha=ALPHA)[0].backward()
    assert yr_leaf.grad is not None and yr_leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("op", ["sid", "edm", "edm_precond"])
def test_opcheck(op):
    (x, yr, yf), w = sid_inputs((2, 3, 5, 5), torch.float32, seed=4)
    x, yr, yf = (t.requires_grad_(True) for t in (x, yr, yf))
    if op == "sid":
        torch.library.opcheck(sid_loss_op, (x, yr, yf, w, ALPHA, OMEGA_MIN))
    elif op == "edm":
        torch.library.opcheck(edm_loss_op, (x, yr, w))
    else:
        cs, co = torch.rand(2, device=DEVICE), torch.rand(2, device=DEVICE)
        torch.library.opcheck(edm_precond_loss_op, (x, yr, cs, co, yf, w))


def test_compile_fullgraph_sees_one_op():
    """Dynamo captures the whole loss + backward with the fused op as one opaque node."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x, yr, yf, w):
        total, per_sample = sid_generator_loss(x * 1.0, yr, yf, w, alpha=ALPHA)
        return total * 2.0, per_sample

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    (x, yr, yf), w = sid_inputs((2, 1, 6, 6), torch.float32, seed=5)
    leaves = [t.requires_grad_(True) for t in (x, yr, yf)]
    total, _ = compiled(*leaves, w)
    total.backward()
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("sid_loss" in o for o in ops) == 1, ops
    ref = losses.sid_generator_loss(x.detach(), yr.detach(), yf.detach(), w, alpha=ALPHA)[0] * 2.0
    torch.testing.assert_close(total.detach(), ref, rtol=1e-5, atol=1e-5)
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("fn", ["sid", "edm"])
def test_bad_input_raises_clear_errors(fn):
    (x, yr, yf), w = sid_inputs((2, 3, 4, 4), torch.float32)

    def call(a, b, c, weight=w):
        if fn == "sid":
            return sid_generator_loss(a, b, c, weight, alpha=ALPHA)
        return edm_denoising_loss(a, b, weight)

    with pytest.raises(ValueError, match="shape"):
        call(x, yr[:, :2].contiguous(), yf[:, :2].contiguous())
    with pytest.raises(ValueError, match="dtype"):
        call(x, yr.half(), yf.half())
    with pytest.raises(ValueError, match="dtype"):
        call(x.double(), yr.double(), yf.double())
    with pytest.raises(ValueError, match="one dense block"):
        call(x[..., ::2], yr[..., ::2], yf[..., ::2])
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, yr, yf)]
    with pytest.raises(ValueError, match="one memory layout"):
        call(cl[0], yr, cl[2])
    with pytest.raises(ValueError, match="non-empty batch"):
        call(x[:0], yr[:0], yf[:0], w[:0])
    with pytest.raises(ValueError, match="weight has shape"):
        call(x, yr, yf, w[:1])
    with pytest.raises(ValueError, match="is on"):
        call(x, yr.to("meta"), yf.to("meta"))


def test_precond_bad_coefficients_and_their_gradient():
    (f, x, t), w = sid_inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="c_skip has shape"):
        edm_precond_denoising_loss(f, x, torch.ones(3), torch.ones(2), t, w)
    c_skip = torch.ones(2, requires_grad=True)
    total, _ = edm_precond_denoising_loss(f, x, c_skip, torch.ones(2), t, w)
    with pytest.raises(NotImplementedError, match="constants"):
        total.backward()


# ---- dispatch -----------------------------------------------------------------------------------

def test_dispatch_explicit_backends(monkeypatch):
    assert dispatch.resolve_backend("torch", DEVICE).name == "torch"
    assert dispatch.resolve_backend("triton", DEVICE).sid_generator_loss is sid_generator_loss
    monkeypatch.setenv("SFD_FAST_BACKEND", "triton")
    assert dispatch.resolve_backend(None, DEVICE).name == "triton"
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        dispatch.resolve_backend("tpu", DEVICE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answers")
def test_dispatch_cpu_rules(caplog, monkeypatch):
    with pytest.raises(RuntimeError, match="'cuda' was requested but cannot run: .*CUDA device"):
        dispatch.resolve_backend("cuda", "cpu")
    assert dispatch.resolve_backend("auto", "cpu").name == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="'triton' was requested but cannot run: .*TRITON_INTERPRET"):
        dispatch.resolve_backend("triton", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CUDA device without the CUDA extension")
def test_dispatch_auto_on_cuda_logs_fallback_once(caplog, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sfd_fast.core.cuda_ext", None)  # as if the extension was never built
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level("WARNING", logger="sfd_fast.core.dispatch"):
        assert dispatch.resolve_backend("auto", "cuda").name == "triton"
        assert dispatch.resolve_backend("auto", "cuda").name == "triton"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "using triton" in lines[0] and "cuda_ext" in lines[0], lines
    with pytest.raises(RuntimeError, match="'cuda' was requested but cannot run: .*cuda_ext"):
        dispatch.resolve_backend("cuda", "cuda")


def test_train_step_triton_matches_torch(tiny_teacher):
    """One SFD step from one seed with each backend: same losses and same weight updates.

    adam_eps = lr = 1 makes Adam's first update g / (|g| + 1), nearly linear in the gradient, so
    the comparison sees gradient differences (eps 1e-8 would turn near-zero gradients into +-lr).
    """
    from sfd_fast import SFDConfig, SFDState, train_step

    cfg = SFDConfig(batch_size=3, forget_batch_size=2, adam_eps=1.0, lr_gen=1.0, lr_fake=1.0)
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        state = SFDState.create(cfg, tiny_teacher)
        before = [p.detach().clone() for p in (*state.generator.parameters(), *state.fake.parameters())]
        metrics = train_step(state, backend=backend)
        after = [p.detach() for p in (*state.generator.parameters(), *state.fake.parameters())]
        results.append((metrics, [a - b for a, b in zip(after, before)]))
    (m_ref, d_ref), (m_tri, d_tri) = results
    for key in ("loss_fake", "loss_gen"):
        torch.testing.assert_close(m_tri[key], m_ref[key], rtol=1e-4, atol=1e-5)
    assert any(d.abs().max() > 1e-4 for d in d_ref), "the step must move the weights for this test to mean anything"
    # Over all weights at once: single elements (and tensors whose update is ~1e-6, the rounding
    # of after - before) differ more, from fp32 summation-order differences in the loss gradients.
    a, b = torch.cat([d.flatten() for d in d_tri]), torch.cat([d.flatten() for d in d_ref])
    assert (a - b).norm() <= 1e-4 * b.norm(), ((a - b).norm(), b.norm())
