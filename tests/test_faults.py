"""Non-finite gradients: the update is skipped exactly (params and optimizer state), counted,
raised on request, and a run that keeps failing stops with a clear message."""

from __future__ import annotations

import pytest
import torch

from sfd_fast import SFDConfig, SFDState, train_step
from sfd_fast.core.faults import NonFiniteError, check_health

CFG = SFDConfig(batch_size=3, forget_batch_size=2, lr_gen=1e-3, lr_fake=1e-3)


def _poison_once(module):
    """One backward later, the first parameter's gradient is NaN (then the hook removes itself)."""
    p = next(module.parameters())
    handle = None

    def hook(grad):
        handle.remove()
        return grad * float("nan")
    handle = p.register_hook(hook)


def _snapshot(state):
    return ([p.detach().clone() for p in state.generator.parameters()],
            {k: v.clone() for st in state.opt_gen.state.values() for k, v in st.items()},
            [p.detach().clone() for p in state.fake.parameters()])


@pytest.mark.parametrize("fused", [False, True], ids=["masked", "fused_found_inf"])
def test_injected_nan_gradient_is_skipped_and_counted(tiny_teacher, fused):
    state = SFDState.create(CFG, tiny_teacher)
    if fused:
        for name in ("opt_fake", "opt_gen"):
            old = getattr(state, name)
            setattr(state, name, torch.optim.Adam(old.param_groups[0]["params"], lr=1e-3, betas=(0.0, 0.999),
                                                  fused=True))
    train_step(state)
    gen_before, opt_before, fake_before = _snapshot(state)
    _poison_once(state.generator)
    metrics = train_step(state)
    assert int(metrics["skipped_gen"]) == 1 and int(metrics["skipped_fake"]) == 0
    assert int(metrics["nonfinite_streak_gen"]) == 1
    gen_after, opt_after, fake_after = _snapshot(state)
    assert all(torch.equal(a, b) for a, b in zip(gen_before, gen_after)), "generator moved on a skipped step"
    assert all(torch.equal(opt_before[k], opt_after[k]) for k in opt_before), "Adam state moved on a skipped step"
    assert not all(torch.equal(a, b) for a, b in zip(fake_before, fake_after)), "fake score should still train"
    metrics = train_step(state)  # the next clean step updates again and resets the streak
    assert int(metrics["skipped_gen"]) == 1 and int(metrics["nonfinite_streak_gen"]) == 0
    assert not all(torch.equal(a, b.detach()) for a, b in zip(gen_after, state.generator.parameters()))
    assert all(torch.isfinite(p).all() for p in state.generator.parameters())


def test_raise_policy_names_the_step(tiny_teacher):
    state = SFDState.create(CFG.replace(nonfinite_policy="raise"), tiny_teacher)
    _poison_once(state.fake)
    with pytest.raises(NonFiniteError, match="non-finite fake loss or gradient at step 0"):
        train_step(state)


def test_a_run_that_keeps_failing_stops(tiny_teacher):
    state = SFDState.create(CFG.replace(max_consecutive_nonfinite=2), tiny_teacher)
    for _ in range(2):
        _poison_once(state.generator)
        train_step(state)
    check_health(state, max_consecutive=3)  # 2 in a row is under a limit of 3
    with pytest.raises(NonFiniteError, match="2 consecutive gen updates"):
        check_health(state)
    train_step(state)  # a clean step resets the streak, but the worst streak is remembered
    with pytest.raises(NonFiniteError):
        check_health(state)


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="nonfinite_policy must be 'skip', 'raise' or 'sanitize', got 'ignore'"):
        SFDConfig(nonfinite_policy="ignore")


@pytest.mark.parametrize("options", [None, "fused"])
def test_a_batch_of_only_masked_samples_is_skipped(tiny_teacher, options):
    """Every sample's loss NaN (a NaN teacher output): nothing to learn from, so the update is a
    counted skip (not Adam momentum alone), and the run stops at the consecutive-skip limit."""
    state = SFDState.create(CFG, tiny_teacher)
    original = state.teacher.forward
    state.teacher.forward = lambda x, sigma, c: original(x, sigma, c) * float("nan")
    before = [p.detach().clone() for p in state.generator.parameters()]
    metrics = train_step(state, options=options)
    assert int(metrics["nonfinite_gen"]) == 5 and int(metrics["skipped_gen"]) == 1
    assert int(metrics["skipped_fake"]) == 0  # the fake score's own loss is fine
    assert all(torch.equal(a, b) for a, b in zip(before, state.generator.parameters()))


def test_plain_distill_stops_on_a_nan_teacher(tiny_teacher):
    """The plain loop checks health at each log: a NaN teacher is an error, not a saved NaN model."""
    from sfd_fast.train.distill import distill

    with torch.no_grad():
        for p in tiny_teacher.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="weights became non-finite"):
        distill(tiny_teacher, CFG, steps=2, log_every=1, progress=False)
