"""train_step: what changes when, label plumbing, determinism."""

import pytest
import torch

from sfd_fast import SFDConfig, SFDState, train_step
from sfd_fast.core import dispatch
from sfd_fast.core.step import fake_score_step, generator_step

CONFIG = SFDConfig(batch_size=4, forget_batch_size=2, lr_gen=1e-3, lr_fake=1e-3, lambda_g=1.0, lambda_sg=1.0)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_each_phase_changes_only_its_network(tiny_teacher):
    state = SFDState.create(CONFIG, tiny_teacher)
    teacher0, fake0, gen0, ema0 = (_params(m) for m in (state.teacher, state.fake, state.generator,
                                                         state.generator_ema))
    cond = state.forget.sample_conditions(4, 2, state.rng, "cpu")
    fake_score_step(state, cond, dispatch.REFERENCE)
    assert _changed(fake0, state.fake) and not _changed(gen0, state.generator)
    assert not _changed(teacher0, state.teacher)
    fake1 = _params(state.fake)
    generator_step(state, cond, dispatch.REFERENCE)
    assert _changed(gen0, state.generator) and not _changed(fake1, state.fake)
    assert not _changed(teacher0, state.teacher) and not _changed(ema0, state.generator_ema)
    assert all(p.grad is None for p in state.teacher.parameters())
    # the fake score is trainable again after the generator step froze it
    assert all(p.requires_grad for p in state.fake.parameters())


def test_full_step_updates_ema_and_counters(tiny_teacher):
    state = SFDState.create(CONFIG, tiny_teacher)
    teacher0, ema0 = _params(state.teacher), _params(state.generator_ema)
    metrics = train_step(state)
    assert _changed(ema0, state.generator_ema) and not _changed(teacher0, state.teacher)
    assert state.step == 1 and state.images_seen == 6
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    assert set(metrics) >= {"loss_fake", "loss_gen", "loss_gen_remain", "loss_gen_forget", "nonfinite_fake",
                            "nonfinite_gen"}


def test_same_seed_same_metrics(tiny_teacher):
    def run():
        state = SFDState.create(CONFIG, tiny_teacher)
        return [{k: float(v) for k, v in train_step(state).items()} for _ in range(3)]

    assert run() == run()
    other = SFDState.create(CONFIG.replace(seed=1), tiny_teacher)
    assert float(train_step(other)["loss_fake"]) != run()[0]["loss_fake"]


def test_teacher_sees_override_and_fake_sees_forget_labels(tiny_teacher):
    config = CONFIG.replace(forget_classes=(3,), override_classes=(5,))
    state = SFDState.create(config, tiny_teacher)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[f"{name}{len(seen)}"] = args[2].clone()
        return hook

    state.teacher.register_forward_hook(record("teacher"))
    state.fake.register_forward_hook(record("fake"))
    train_step(state)
    (teacher_c,) = [v for k, v in seen.items() if k.startswith("teacher")]
    fake_c = [v for k, v in seen.items() if k.startswith("fake")]
    assert (teacher_c[4:] == 5).all() and not (teacher_c[:4] == 3).any()
    for c in fake_c:  # fake-score step and generator step both see the forget label
        assert (c[4:] == 3).all() and torch.equal(c[:4], teacher_c[:4])


def test_random_override_draws_remaining_classes(tiny_teacher):
    state = SFDState.create(CONFIG.replace(forget_classes=(0, 1), override_classes=None), tiny_teacher)
    cond = state.forget.sample_conditions(64, 64, state.rng, "cpu")
    override = cond.teacher[64:]
    assert not torch.isin(override, torch.tensor([0, 1])).any() and len(override.unique()) > 3


def _teacher_returns_nan_on_first_sample(state):
    original = state.teacher.forward

    def nan_on_first_sample(x, sigma, c):
        out = original(x, sigma, c).clone()
        out[0] = float("nan")
        return out

    state.teacher.forward = nan_on_first_sample


def test_nan_sample_does_not_poison_the_update(tiny_teacher):
    """A NaN sample is masked from the loss and from its gradient (exactly zero, as in the fused
    kernels) and counted; the other samples still train, as in the reference code's masking,
    and no weight turns NaN. (Before issue 14 the reference left NaN in the gradients through
    0 * NaN, so one bad sample skipped the whole update while the kernels applied it.)"""
    state = SFDState.create(CONFIG, tiny_teacher)
    cond = state.forget.sample_conditions(4, 2, state.rng, "cpu")
    _teacher_returns_nan_on_first_sample(state)
    before = _params(state.generator)
    metrics = generator_step(state, cond, dispatch.REFERENCE)
    assert metrics["nonfinite_gen"] == 1 and torch.isfinite(metrics["loss_gen"])
    assert all(torch.isfinite(p).all() for p in state.generator.parameters())
    assert _changed(before, state.generator) and metrics["skipped_gen"] == 0


def test_sanitize_policy_steps_like_the_reference_code(tiny_teacher):
    """nonfinite_policy="sanitize": mask the NaN sample, nan_to_num the gradients, update anyway."""
    state = SFDState.create(CONFIG.replace(nonfinite_policy="sanitize"), tiny_teacher)
    cond = state.forget.sample_conditions(4, 2, state.rng, "cpu")
    _teacher_returns_nan_on_first_sample(state)
    before = _params(state.generator)
    metrics = generator_step(state, cond, dispatch.REFERENCE)
    assert metrics["nonfinite_gen"] == 1 and _changed(before, state.generator)
    assert all(torch.isfinite(p).all() for p in state.generator.parameters())


@pytest.mark.parametrize("bad, message", [
    (dict(forget_classes=(10,)), "forget class 10 is out of range.*0..9"),
    (dict(forget_classes=(2,), override_classes=(2,)), "override class 2 for forget class 2 equals the forget"),
    (dict(forget_classes=tuple(range(10)), override_classes=None), "every class is forgotten"),
    (dict(forget_classes=(1, 2), override_classes=(2, 3)), "is itself a forget class"),
])
def test_bad_forget_spec_is_a_clear_error(tiny_teacher, bad, message):
    with pytest.raises(ValueError, match=message):
        SFDState.create(CONFIG.replace(**bad), tiny_teacher)


def test_config_validation_and_json_roundtrip():
    with pytest.raises(ValueError, match="lr_gen must be > 0, got -1"):
        SFDConfig(lr_gen=-1)
    with pytest.raises(ValueError, match="override_classes .* one entry per forget class"):
        SFDConfig(forget_classes=(0, 1), override_classes=(2,))
    with pytest.raises(ValueError, match="unknown SFDConfig fields \\['lr'\\]"):
        SFDConfig.from_dict({"lr": 1})
    import json
    assert SFDConfig.from_dict(json.loads(CONFIG.to_json())) == CONFIG
