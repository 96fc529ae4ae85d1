"""The CUDA path's arithmetic (csrc/loss_math.h) and argument checks (csrc/loss_checks.h), built
for the CPU by tests/cuda_math_host.py, against the reference in sfd_fast.core.losses.

Runs everywhere (a CPU C++ extension links fine on a CPU torch); the build takes ~30 s once per
session, then is cached on disk. What the GPU kernels add on top (vector paths, splits, the
block reduction) is tested on the GPU in test_cuda_ext.py; here: the formulas, the per-row
finalisation (omega, NaN propagation, finite mask, masked total), the backward's row
coefficient, need flags, layouts, and the exact-zero gradients of masked rows.

Tolerances: tests/fused_loss_asserts.py (the host build sums each row over 256 strided fp32
lanes combined pairwise, like the kernel's threads, so the same bounds apply).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import cuda_math_host
from fused_loss_asserts import (ALPHA, DTYPES, OMEGA_MIN, SHAPES, assert_forward_close, assert_grad_close,
                                images, leaves, poison_rows, sid_scale)
from sfd_fast.core import cuda_ext, losses

CL = torch.channels_last
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="session")
def host():
    try:
        built = cuda_math_host.load()
    except Exception as err:  # a compiler error must fail loudly, not skip
        pytest.fail(f"building {cuda_math_host.SOURCE} failed: {type(err).__name__}: {str(err)[-3000:]}")
    print(f"host reference build/load: {cuda_math_host.BUILD_SECONDS:.1f} s", file=sys.stderr)
    return built


def _loss(module, kind, ins, w):
    if kind == "sid":
        return module.sid_generator_loss(*ins, w, alpha=ALPHA, omega_min=OMEGA_MIN)
    return module.edm_denoising_loss(*ins, w)


def _inputs(kind, shape, dtype, memory_format=torch.contiguous_format, seed=0):
    imgs, w = images(shape, dtype, device="cpu", seed=seed, memory_format=memory_format)
    return (imgs if kind == "sid" else imgs[:2]), w


def _scale(kind, imgs, r_per):
    return sid_scale(*imgs) if kind == "sid" else r_per.detach()


# ---- values and gradients against the reference -------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["sid", "edm"])
def test_host_build_matches_reference(host, kind, shape, dtype):
    imgs, w = _inputs(kind, shape, dtype)
    k_in, r_in = leaves(imgs), leaves(imgs, torch.float32)
    k_total, k_per = _loss(host, kind, k_in, w)
    r_total, r_per = _loss(losses, kind, r_in, w)
    scale = _scale(kind, imgs, r_per)
    assert_forward_close(k_per, r_per.detach(), scale)
    assert_forward_close(k_total, r_total.detach(), (w * scale).sum())
    k_total.backward()
    r_total.backward()
    for k, r in zip(k_in, r_in):
        assert k.grad.dtype == dtype and k.grad.shape == k.shape
        assert_grad_close(k.grad, r.grad, dtype)


@pytest.mark.parametrize("kind", ["sid", "edm"])
def test_gradient_through_per_sample(host, kind):
    imgs, w = _inputs(kind, (3, 2, 11, 13), torch.float32)
    v = torch.tensor([0.3, -1.0, 2.0])
    for use_total in (True, False):
        grads = []
        for module in (host, losses):
            ins = leaves(imgs)
            total, per = _loss(module, kind, ins, w)
            ((0.5 * total if use_total else 0) + (v * per).sum()).backward()
            grads.append([t.grad for t in ins])
        for kg, rg in zip(*grads):
            assert_grad_close(kg, rg, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("kind", ["sid", "edm"])
def test_channels_last_matches_reference(host, kind, channels, dtype):
    """Rows as flat dense blocks: channels_last reads and writes at the same flat offsets in
    every tensor, and the gradients come back in the inputs' strides."""
    imgs, w = _inputs(kind, (3, channels, 9, 11), dtype, memory_format=CL)
    assert not imgs[0].is_contiguous()
    k_in, r_in = leaves(imgs), leaves(imgs, torch.float32)
    k_total, k_per = _loss(host, kind, k_in, w)
    r_total, r_per = _loss(losses, kind, r_in, w)
    scale = _scale(kind, imgs, r_per)
    assert_forward_close(k_per, r_per.detach(), scale)
    k_grads = torch.autograd.grad(k_total, k_in)  # the op's own tensors, strides untouched
    r_grads = torch.autograd.grad(r_total, r_in)
    for t, k, r in zip(k_in, k_grads, r_grads):
        assert k.stride() == t.stride()
        assert_grad_close(k, r, dtype)


# ---- masked rows ------------------------------------------------------------------------------

# Each case: {row: (input index, element, value)}. SiD inputs (x_g, y_r, y_f); EDM (D, x).
FAULTS = {
    "sid": [
        {1: (0, 3, NAN)},                                       # NaN x_g: omega NaN, 0 / NaN territory
        {0: (1, 0, INF)},                                       # +inf y_r: e and d inf -> NaN
        {2: (2, 5, -INF)},                                      # -inf y_f: per_sample -inf
        {0: (0, 1, INF), 2: (1, 4, NAN), 3: (2, 2, -INF)},      # three bad rows, one good
    ],
    "edm": [
        {1: (0, 3, NAN)},
        {0: (1, 0, INF)},
        {2: (0, 5, -INF)},
        {0: (0, 1, INF), 2: (1, 4, NAN), 3: (0, 2, -INF)},
    ],
}


def _fault_cases():
    for kind, cases in FAULTS.items():
        for i, rows in enumerate(cases):
            yield pytest.param(kind, rows, id=f"{kind}-{i}")


@pytest.mark.parametrize("per_sample_grad", [False, True], ids=["total", "total+per_sample"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bad", list(_fault_cases()))
def test_masked_rows(host, kind, bad, dtype, per_sample_grad):
    """Non-finite rows: per_sample non-finite on exactly those rows (the reference's skip
    decision), total = the finite rows' weighted sum, exactly zero gradients there (also with an
    upstream gradient on per_sample), the other rows' gradients as the reference."""
    imgs, w = _inputs(kind, (4, 3, 5, 6), dtype)
    imgs = poison_rows(imgs, bad)
    k_in, r_in = leaves(imgs), leaves(imgs, torch.float32)
    k_total, k_per = _loss(host, kind, k_in, w)
    r_total, r_per = _loss(losses, kind, r_in, w)
    masked = torch.tensor([b in bad for b in range(4)])
    assert torch.equal(~torch.isfinite(k_per), masked)
    assert torch.equal(torch.isfinite(k_per), torch.isfinite(r_per))
    good = (~masked).nonzero().flatten()
    terms = (w[good] * k_per[good]).detach()
    assert (k_total.detach() - terms.sum()).abs() <= 1e-6 * terms.abs().sum()  # fp32 rounding of <= 4 adds
    if len(good):
        assert_forward_close(k_per[good], r_per.detach()[good], _scale(kind, imgs, r_per)[good])
    else:
        assert k_total.item() == 0.0
    v = torch.tensor([-1.0, 0.5, 1.5, 2.0])  # no zero: every masked row gets an upstream gradient
    outs, grads = ([k_total, k_per], [torch.tensor(0.5), v]) if per_sample_grad else ([k_total], [None])
    torch.autograd.backward(outs, grads)
    outs, grads = ([r_total, r_per], [torch.tensor(0.5), v]) if per_sample_grad else ([r_total], [None])
    torch.autograd.backward(outs, grads)
    for k, r in zip(k_in, r_in):
        assert torch.count_nonzero(k.grad[masked]) == 0, "masked rows must get exact zero gradients"
        assert torch.count_nonzero(r.grad[masked]) == 0  # the reference agrees
        if len(good):
            assert_grad_close(k.grad, r.grad, dtype, rows=good)


def test_all_rows_masked(host):
    imgs, w = _inputs("sid", (2, 3, 4, 4), torch.float32)
    imgs = poison_rows(imgs, {0: (0, 0, NAN), 1: (2, 1, INF)})
    ins = leaves(imgs)
    total, per = host.sid_generator_loss(*ins, w, alpha=ALPHA)
    assert total.item() == 0.0 and not torch.isfinite(per).any()
    torch.autograd.backward([total, per], [torch.tensor(1.0), torch.ones(2)])
    assert all(torch.count_nonzero(t.grad) == 0 for t in ins)


# ---- need flags -----------------------------------------------------------------------------

@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (False, False, True)], ids=str)
def test_sid_need_flags(host, need):
    imgs, w = _inputs("sid", (3, 3, 6, 6), torch.bfloat16)
    full = leaves(imgs)
    host.sid_generator_loss(*full, w, alpha=ALPHA)[0].backward()
    part = [t.detach().clone().requires_grad_(n) for t, n in zip(imgs, need)]
    host.sid_generator_loss(*part, w, alpha=ALPHA)[0].backward()
    for t, f, n in zip(part, full, need):
        assert (t.grad is not None) == n
        if n:
            assert torch.equal(t.grad, f.grad)
    _, per, omega = host.ops.sid_loss_fwd(*imgs, w, ALPHA, OMEGA_MIN)
    outs = host.ops.sid_loss_bwd(torch.ones(()), None, *imgs, w, per, omega, ALPHA, *need)
    for o, f, n in zip(outs, full, need):
        assert torch.equal(o, f.grad) if n else o.shape == (0,)


def test_edm_detached_target_gets_no_gradient(host):
    """The fake-score step: the target x_g is detached, only dD is computed."""
    (d, x), w = _inputs("edm", (4, 3, 7, 7), torch.float16, memory_format=CL)
    full = leaves([d, x])
    host.edm_denoising_loss(*full, w)[0].backward()
    dd = d.detach().clone().requires_grad_(True)
    host.edm_denoising_loss(dd, x, w)[0].backward()
    assert torch.equal(dd.grad, full[0].grad)
    _, per = host.ops.edm_loss_fwd(d, x, w)
    gd, gt = host.ops.edm_loss_bwd(torch.ones(()), None, d, x, w, per, True, False)
    assert gt.shape == (0,) and gd.stride() == d.stride() and torch.equal(gd, full[0].grad)


# ---- argument checks (csrc/loss_checks.h, shared with the CUDA ops) ----------------------------

def _t(shape=(2, 3, 4, 4)):
    return torch.randn(shape)


LAYOUT_CASES = [
    # (description, tensor, accepted)
    ("contiguous", _t(), True),
    ("channels_last", _t().contiguous(memory_format=CL), True),
    ("H/W transposed", _t((2, 3, 4, 6)).transpose(2, 3), True),
    ("batch 1, channels_last", _t((1, 4, 5, 3)).contiguous(memory_format=CL), True),
    ("size-1 dim with an odd stride", _t((2, 3, 4)).unsqueeze(1).as_strided((2, 1, 3, 4), (12, 99, 4, 1)), True),
    ("every other element", _t((2, 3, 4, 8))[..., ::2], False),
    ("batch innermost", _t((3, 4, 4, 2)).permute(3, 0, 1, 2), False),
    ("channel slice", _t((2, 6, 4, 4))[:, :3], False),
    ("expanded (stride 0)", _t((1, 3, 4, 4)).expand(2, 3, 4, 4), False),
]


@pytest.mark.parametrize("what,t,accepted", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_layout_rule_is_the_same_in_python_and_cpp(host, what, t, accepted):
    """cuda_ext's Python check and the C++ check accept exactly the same layouts."""
    w = torch.ones(t.shape[0])
    ins = [t, t.clone(), t.clone()]
    assert all(i.stride() == t.stride() for i in ins[1:]) or not accepted
    if accepted:
        cuda_ext._check_images(*zip(ins, ("x_g", "y_real", "y_fake")))
        host.ops.sid_loss_fwd(*ins, w, ALPHA, OMEGA_MIN)
        host.ops.edm_loss_fwd(*ins[:2], w)
    else:
        with pytest.raises(ValueError, match="does not store each sample as one dense block"):
            cuda_ext._check_images((t, "x_g"))
        with pytest.raises(RuntimeError, match=r"x_g \(shape .* strides .*\) does not store each sample as one "
                                               r"dense block; allowed: contiguous or channels_last"):
            host.ops.sid_loss_fwd(t, t, t, w, ALPHA, OMEGA_MIN)


def test_cpp_rejects_mixed_layouts(host):
    x = _t()
    w = torch.ones(2)
    x_cl = x.contiguous(memory_format=CL)
    fix = r"\(call \.contiguous\(\) or \.contiguous\(memory_format=torch\.channels_last\) on all inputs\)"
    with pytest.raises(RuntimeError, match=r"y_fake has strides \[48, 1, 12, 3\] but x_g has \[48, 16, 4, 1\]; "
                                           r"all image inputs must share one memory layout " + fix):
        host.ops.sid_loss_fwd(x, x, x_cl, w, ALPHA, OMEGA_MIN)
    with pytest.raises(RuntimeError, match="target has strides .* but denoised has"):
        host.ops.edm_loss_fwd(x_cl, x, w)
    _, per = host.ops.edm_loss_fwd(x, x, w)
    with pytest.raises(RuntimeError, match="target has strides"):
        host.ops.edm_loss_bwd(torch.ones(()), None, x, x_cl, w, per, True, False)
    with pytest.raises(ValueError, match="all image inputs must share one memory layout"):
        host.edm_denoising_loss(x, x_cl, w)


CPP_BAD = [
    ("dtype", lambda x, w: (x.double(), x.double(), x.double(), w), "x_g has dtype Double; allowed: Float"),
    ("shape", lambda x, w: (x, x[:, :2].contiguous(), x, w), "y_real has shape"),
    ("mixed dtype", lambda x, w: (x, x.half(), x, w), "y_real has dtype Half but x_g has Float"),
    ("weight dtype", lambda x, w: (x, x, x, w.double()), "weight has dtype Double"),
    ("weight shape", lambda x, w: (x, x, x, w[:1]), r"weight must have shape \(B,\) = \(2,\)"),
    ("empty batch", lambda x, w: (x[:0], x[:0], x[:0], w[:0]), "x_g is an empty batch"),
    ("1-D", lambda x, w: (x.flatten(),) * 3 + (w,), "at least 2 dims"),
]


@pytest.mark.parametrize("what,make,match", CPP_BAD, ids=[c[0] for c in CPP_BAD])
def test_cpp_checks_name_the_bad_input(host, what, make, match):
    """csrc/loss_checks.h on the CPU: the CUDA ops run the same checks (with device CUDA)."""
    x, w = _t(), torch.ones(2)
    with pytest.raises(RuntimeError, match=match):
        host.ops.sid_loss_fwd(*make(x, w), ALPHA, OMEGA_MIN)


def test_cpp_checks_backward_arguments(host):
    (x, yr, yf), w = _inputs("sid", (2, 3, 4, 4), torch.float32)
    _, per, omega = host.ops.sid_loss_fwd(x, yr, yf, w, ALPHA, OMEGA_MIN)
    g = torch.ones(())
    with pytest.raises(RuntimeError, match=r"grad_per_sample must have shape \(B,\)"):
        host.ops.sid_loss_bwd(g, torch.ones(3), x, yr, yf, w, per, omega, ALPHA, True, True, True)
    with pytest.raises(RuntimeError, match="grad_total must be a one-element Float tensor"):
        host.ops.sid_loss_bwd(torch.ones(2), None, x, yr, yf, w, per, omega, ALPHA, True, True, True)
    with pytest.raises(RuntimeError, match="alpha must be a finite number"):
        host.ops.sid_loss_bwd(g, None, x, yr, yf, w, per, omega, float("nan"), True, True, True)
    with pytest.raises(RuntimeError, match="omega has dtype"):
        host.ops.sid_loss_bwd(g, None, x, yr, yf, w, per, omega.double(), ALPHA, True, True, True)


# ---- cuda_ext's autograd wiring, run with the host ops in place of the CUDA ones ----------------

def test_cuda_ext_backward_asks_only_for_needed_gradients(host, monkeypatch):
    """cuda_ext's backward formulas pass ctx.needs_input_grad as the need flags and return None for
    the rest (the host ops have the CUDA ops' schemas, so they stand in for them here)."""
    calls = []

    def spy(name):
        def call(*args):
            calls.append((name, args[-3:] if name == "sid" else args[-2:]))
            return getattr(host.ops, f"{name}_loss_bwd")(*args)
        return call

    monkeypatch.setattr(torch.ops.sfd_fast_C, "sid_loss_bwd", spy("sid"), raising=False)
    monkeypatch.setattr(torch.ops.sfd_fast_C, "edm_loss_bwd", spy("edm"), raising=False)
    (x, yr, yf), w = _inputs("sid", (2, 3, 5, 5), torch.float32, memory_format=CL)
    full = leaves([x, yr, yf])
    host.sid_generator_loss(*full, w, alpha=ALPHA)[0].backward()

    _, per, omega = host.ops.sid_loss_fwd(x, yr, yf, w, ALPHA, OMEGA_MIN)
    ctx = types.SimpleNamespace(saved_tensors=(x, yr, yf, w, per, omega), alpha=ALPHA,
                                needs_input_grad=(False, True, False, False, False, False))
    grads = cuda_ext._sid_backward(ctx, torch.ones(()), None, None)
    assert calls[-1] == ("sid", (False, True, False))
    assert grads[0] is None and grads[2:] == (None,) * 4 and torch.equal(grads[1], full[1].grad)

    _, per_e = host.ops.edm_loss_fwd(x, yr, w)
    edm_full = leaves([x, yr])
    host.edm_denoising_loss(*edm_full, w)[0].backward()
    ctx = types.SimpleNamespace(saved_tensors=(x, yr, w, per_e), needs_input_grad=(True, False, False))
    gd, gt, gw = cuda_ext._edm_backward(ctx, torch.ones(()), None)
    assert calls[-1] == ("edm", (True, False))  # the fake-score step: dD only
    assert gt is None and gw is None and torch.equal(gd, edm_full[0].grad) and gd.stride() == x.stride()
