"""Resumable checkpoints: bit-exact resume, retention, and refusal of damaged files."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sfd_fast import CheckpointError, SFDConfig, SFDState, train_step
from sfd_fast.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

CFG = SFDConfig(batch_size=3, forget_batch_size=2, lr_gen=1e-3, lr_fake=1e-3, ema_halflife_kimg=0.01)


def _losses(state, steps):
    return [{k: v.clone() for k, v in train_step(state).items()} for _ in range(steps)]


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_kill_and_resume_equals_an_uninterrupted_run(tiny_teacher, tmp_path):
    teacher = copy.deepcopy(tiny_teacher)
    straight = SFDState.create(CFG, tiny_teacher)
    expected = _losses(straight, 4)

    first = SFDState.create(CFG, teacher)
    _losses(first, 2)
    path = save_checkpoint(first, tmp_path)
    _losses(first, 1)  # work after the checkpoint is lost in the "crash"
    del first

    resumed = SFDState.create(CFG, copy.deepcopy(teacher))
    torch.manual_seed(123)  # a fresh process's global RNG differs too
    meta = load_checkpoint(path, resumed)
    assert meta["step"] == 2 and resumed.step == 2 and resumed.images_seen == 10
    got = _losses(resumed, 2)
    for want, have in zip(expected[2:], got):
        for key in want:
            assert torch.equal(want[key], have[key]), f"{key} differs after resume: {want[key]} vs {have[key]}"
    for mod in ("generator", "generator_ema", "fake"):
        for a, b in zip(_params(getattr(straight, mod)), _params(getattr(resumed, mod))):
            assert torch.equal(a, b), f"{mod} weights differ after resume"


def test_retention_keeps_the_last_n(tiny_teacher, tmp_path):
    state = SFDState.create(CFG, tiny_teacher)
    for _ in range(4):
        train_step(state)
        save_checkpoint(state, tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.fixture
def saved(tiny_teacher, tmp_path):
    state = SFDState.create(CFG, tiny_teacher)
    train_step(state)
    return save_checkpoint(state, tmp_path), tiny_teacher


def _untouched(state_before, state_after):
    return all(torch.equal(a, b) for a, b in zip(_params(state_before.generator), _params(state_after.generator)))


def test_truncated_checkpoint_is_refused_before_loading(saved):
    path, teacher = saved
    weights = path / "state.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    fresh = SFDState.create(CFG, teacher)
    before = copy.deepcopy(fresh)
    with pytest.raises(CheckpointError, match="truncated or replaced; nothing was loaded"):
        load_checkpoint(path, fresh)
    assert _untouched(before, fresh) and fresh.step == 0


def test_tampered_checkpoint_is_refused(saved):
    path, teacher = saved
    weights = path / "state.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte inside a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        load_checkpoint(path, SFDState.create(CFG, teacher))


def test_checkpoint_of_another_config_is_refused(saved):
    path, teacher = saved
    with pytest.raises(CheckpointError, match="different config.*lr_gen"):
        load_checkpoint(path, SFDState.create(CFG.replace(lr_gen=5e-4), teacher))


def test_checkpoint_is_plain_json_and_safetensors(saved):
    path, _ = saved
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "state.json", "state.safetensors"]
    meta = json.loads((path / "state.json").read_text())
    assert meta["step"] == 1 and len(meta["weights"]["sha256"]) == 64
