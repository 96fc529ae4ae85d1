"""One bad sample, three backends, one answer: the same injected NaN/inf rows through the torch
reference, the Triton kernels (CPU: the interpreter) and the CUDA extension's math compiled for
the host (csrc/loss_math.h, the very code the .cu kernels run; tests/cuda_math_host.py).

Each must give: the same non-finite per_sample rows, exactly zero gradients on those rows, the
same gradients elsewhere, and the same skip decision of the non-finite guard. Before issue 14
the reference gave NaN gradients on every masked row (0 * inf in autograd), so "skip" dropped
the whole update, while Triton gave NaN on a NaN-input row and zeros on an inf row, and CUDA zeros.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of the Triton kernels

import pytest  # noqa: E402

from sfd_fast.core import dispatch, faults, losses  # noqa: E402

ALPHA, OMEGA_MIN = 1.2, 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN, INF = float("nan"), float("inf")
# (row, input index, value): NaN in y_fake; +inf in x_g; NaN in y_real (omega NaN); -inf in y_real.
SID_POISON = [(1, 2, NAN), (2, 0, INF), (3, 1, NAN), (4, 1, -INF)]
EDM_POISON = [(1, 0, NAN), (2, 1, INF), (4, 0, -INF)]


@pytest.fixture(scope="module")
def backends():
    pytest.importorskip("triton", reason="triton is not installed (pip install sfd_fast[triton])")
    from cuda_math_host import load as load_host_math  # tests/ is on sys.path (rootdir conftest)

    found = {"torch": dispatch.REFERENCE, "triton": dispatch.resolve_backend("triton", DEVICE)}
    host = load_host_math()
    found["cuda (host build of its math)"] = dispatch.LossFunctions("cuda-host", host.sid_generator_loss,
                                                                      host.edm_denoising_loss)
    return found


def poisoned(kind: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    shape = (6, 3, 5, 7)
    x = torch.randn(shape, generator=g)
    inputs = [x, x + 0.5 * torch.randn(shape, generator=g)]
    if kind == "sid":
        inputs.append(inputs[1] + 0.2 * torch.randn(shape, generator=g))
    for row, which, value in SID_POISON if kind == "sid" else EDM_POISON:
        inputs[which][row, row % 3, 1, 2] = value
    weight = torch.rand(shape[0], generator=g) + 0.1
    grad_ps = torch.rand(shape[0], generator=g)
    return [t.to(DEVICE, dtype) for t in inputs], weight.to(DEVICE), grad_ps.to(DEVICE)


def forward_backward(fns, kind, inputs, weight, grad_ps):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    if kind == "sid":
        total, per_sample = fns.sid_generator_loss(*leaves, weight, alpha=ALPHA, omega_min=OMEGA_MIN)
    else:
        total, per_sample = fns.edm_denoising_loss(*leaves, weight)
    masked_ps = torch.where(torch.isfinite(per_sample), per_sample, 0.0)  # a per-sample metric's gradient
    (total + (masked_ps * grad_ps).sum()).backward()
    skip = ~faults.check_finite(total, leaves)  # the guard's decision, as train_step takes it
    return total.detach(), per_sample.detach(), [t.grad for t in leaves], bool(skip)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter numpy on NaN rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["sid", "edm"])
def test_backends_agree_on_masked_rows(backends, kind, dtype):
    inputs, weight, grad_ps = poisoned(kind, dtype)
    results = {name: forward_backward(fns, kind, inputs, weight, grad_ps) for name, fns in backends.items()}
    ref_total, ref_ps, ref_grads, ref_skip = results["torch"]
    bad = ~torch.isfinite(ref_ps)
    expected_bad = {row for row, _, _ in (SID_POISON if kind == "sid" else EDM_POISON)}
    assert set(bad.nonzero().flatten().tolist()) == expected_bad
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]  # one rounding of the grads
    for name, (total, per_sample, grads, skip) in results.items():
        assert torch.equal(~torch.isfinite(per_sample), bad), f"{name}: other non-finite rows"
        assert torch.isfinite(total), name
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(per_sample[~bad], ref_ps[~bad], rtol=1e-5, atol=1e-5, msg=name)
        assert skip is ref_skip is False, f"{name}: masked rows must not skip the update"
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            assert torch.equal(g[bad].float(), torch.zeros_like(g[bad], dtype=torch.float32)), \
                f"{name}: gradient {i} is not exactly zero on the masked rows"
            torch.testing.assert_close(g[~bad].float(), r[~bad].float(), rtol=tol, atol=tol * r.abs().max().item(),
                                       msg=f"{name} grad {i}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ["sid", "edm"])
def test_backends_agree_to_skip_a_nan_weight(backends, kind):
    """A NaN weight on a good row cannot be masked by the loss: every backend skips the update."""
    inputs, weight, grad_ps = poisoned(kind, torch.float32)
    weight[0] = NAN
    decisions = {name: forward_backward(fns, kind, inputs, weight, grad_ps)[3] for name, fns in backends.items()}
    assert all(decisions.values()), decisions


def test_reference_masked_rows_fail_on_plain_autograd():
    """Why the reference masks inputs, not only the total: plain autograd leaks NaN into the grads."""
    inputs, weight, _ = poisoned("sid", torch.float32)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    x, yr, yf = leaves
    omega = losses.sid_omega(x, yr, OMEGA_MIN)
    d = yr - yf
    per_sample = (d * ((yr - x) - ALPHA * d)).flatten(1).sum(1) / omega
    losses.masked_weighted_sum(per_sample, weight).backward()
    assert not torch.isfinite(x.grad).all()
