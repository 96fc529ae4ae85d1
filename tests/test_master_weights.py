"""bf16 trained weights with fp32 master copies: same updates as fp32 Adam, resumable, fault-safe."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sfd_fast import SFDConfig
from sfd_fast.core.faults import guarded_step
from sfd_fast.core.master_weights import MasterWeightAdam, full_precision_params, use_master_weights

ADAM = dict(lr=1e-2, betas=(0.0, 0.999), eps=1e-8)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))


def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def test_masters_follow_fp32_adam_and_weights_are_their_rounding():
    fp32, low = _model(), _model()
    ref = torch.optim.Adam(fp32.parameters(), **ADAM)
    opt = use_master_weights(low, torch.optim.Adam(low.parameters(), **ADAM))
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    for step in range(4):
        _grads(low, step)  # bf16 gradients; fp32 Adam gets the same values
        for p, q in zip(fp32.parameters(), low.parameters()):
            p.grad = q.grad.float()
        ref.step()
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in low.parameters())
    for p, m, q in zip(fp32.parameters(), opt.master_params, low.parameters()):
        assert torch.equal(p, m)
        assert torch.equal(q, p.detach().to(torch.bfloat16))


def test_updates_below_bf16_resolution_accumulate_in_the_masters():
    low, naive_model = _model(), _model()
    opt = use_master_weights(low, torch.optim.Adam(low.parameters(), lr=1e-6))
    naive_model.to(torch.bfloat16)
    naive = torch.optim.Adam(naive_model.parameters(), lr=1e-6)
    start = [m.clone() for m in opt.master_params]
    naive_start = [p.detach().clone() for p in naive_model.parameters()]
    for _ in range(50):
        _grads(low, 0)  # a constant direction: Adam moves each weight by ~1e-6 per step
        _grads(naive_model, 0)
        opt.step()
        naive.step()
    moved = [(m - s).abs() for m, s in zip(opt.master_params, start)]
    assert 2e-5 < max(d.max().item() for d in moved) < 1e-4
    total = sum(d.numel() for d in moved)
    assert sum(int((d > 1e-5).sum()) for d in moved) == total
    # Stepping the bf16 weights directly loses most of those updates (only near-zero weights move).
    naive_changed = sum(int((p != s).sum()) for p, s in zip(naive_model.parameters(), naive_start))
    assert naive_changed < total // 4, f"{naive_changed} of {total} bf16 weights moved"


def test_state_dict_resume_is_bit_exact():
    a, b = _model(), _model(seed=5)
    opt_a = use_master_weights(a, torch.optim.Adam(a.parameters(), **ADAM))
    for step in range(2):
        _grads(a, step)
        opt_a.step()
    sd = opt_a.state_dict()
    assert all("master" in e and e["master"].dtype == torch.float32 for e in sd["state"].values())
    assert "master" not in opt_a.state[opt_a.master_params[0]], "state_dict must not touch the live state"
    opt_b = use_master_weights(b, torch.optim.Adam(b.parameters(), **ADAM))
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(sd))  # as read from a file (load_state_dict aliases tensors)
    for step in range(2, 4):
        _grads(a, step)
        _grads(b, step)
        opt_a.step()
        opt_b.step()
    for p, q in zip(opt_a.master_params + list(a.parameters()), opt_b.master_params + list(b.parameters())):
        assert torch.equal(p, q)


def test_plain_adam_checkpoint_loads_masters_from_the_weights():
    a = _model()
    opt = use_master_weights(a, torch.optim.Adam(a.parameters(), **ADAM))
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    opt.load_state_dict({"state": {}, "param_groups": opt.state_dict()["param_groups"]})
    for m, p in zip(opt.master_params, a.parameters()):
        assert torch.equal(m, p.float())


@pytest.mark.parametrize("finite", [True, False])
def test_skipped_update_leaves_weights_masters_and_moments(finite):
    class _State:
        config = SFDConfig(nonfinite_policy="skip")
        device = torch.device("cpu")
        step = 0

    a = _model()
    opt = use_master_weights(a, torch.optim.Adam(a.parameters(), **ADAM))
    _grads(a, 0)
    opt.step()
    before = [t.clone() for t in list(a.parameters()) + opt.master_params]
    moments = [opt.state[m]["exp_avg"].clone() for m in opt.master_params]
    _grads(a, 1)
    guarded_step(_State(), "gen", opt, torch.tensor(finite))
    after = list(a.parameters()) + opt.master_params
    same = all(torch.equal(x, y) for x, y in zip(before, after))
    assert same != finite
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, opt.master_params)) != finite
    # The module's weights are always the rounding of the masters, skipped or not.
    for p, m in zip(a.parameters(), opt.master_params):
        assert torch.equal(p, m.to(p.dtype))


def test_full_precision_params_and_bad_inputs():
    a = _model()
    plain = torch.optim.Adam(a.parameters())
    assert all(torch.equal(x, y) for x, y in zip(full_precision_params(a, plain), a.parameters()))
    opt = use_master_weights(a, plain)
    assert full_precision_params(a, opt)[0] is opt.master_params[0]
    with pytest.raises(ValueError, match="fresh torch.optim.Adam"):
        use_master_weights(a, torch.optim.SGD(a.parameters(), lr=1.0))
    with pytest.raises(ValueError, match="exactly the module's parameters"):
        use_master_weights(a, torch.optim.Adam(list(a.parameters())[:1]))
    with pytest.raises(ValueError, match="closure"):
        MasterWeightAdam(a.parameters()).step(lambda: 0.0)
