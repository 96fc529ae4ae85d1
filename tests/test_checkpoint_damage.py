"""Damaged and edited checkpoints (issue 19): refused before the state is touched, or skipped for
the previous good one on resume; leftovers of a killed save are cleaned up.

"Rehashed" cases rewrite manifest.json to match an edited file: what a hand edit that also
fixes the hashes looks like, so the structure and content checks behind the hashes are tested too.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from safetensors.torch import load, save

from sfd_fast import CheckpointError, SFDConfig, SFDState, train_step
from sfd_fast.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from sfd_fast.train.resilient import run_resilient

CFG = SFDConfig(batch_size=3, forget_batch_size=2, lr_gen=1e-3, lr_fake=1e-3)


@pytest.fixture
def run(tiny_teacher, tmp_path):
    """Two checkpoints (steps 1 and 2) of one run, and a way to make fresh states of it."""
    state = SFDState.create(CFG, copy.deepcopy(tiny_teacher))
    paths = []
    for _ in range(2):
        train_step(state)
        paths.append(save_checkpoint(state, tmp_path))
    return paths, lambda: SFDState.create(CFG, copy.deepcopy(tiny_teacher))


def rehash(path):
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


def edit_meta(path, change):
    meta = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps(change(meta), indent=1, sort_keys=True))  # as written


def edit_tensors(path, change):
    tensors = load((path / "state.safetensors").read_bytes())
    (path / "state.safetensors").write_bytes(save(change(tensors)))


def weights(state):
    return [p.detach().clone() for p in state.generator.parameters()] + [state.rng.get_state()]


CASES = {
    "state.json step edited": (lambda p: edit_meta(p, lambda m: {**m, "step": 7}), False,  # same size
                               "state.json.*sha256 .* does not match"),
    "state.json is a list": (lambda p: edit_meta(p, lambda m: []), True, "expected a JSON object, got list"),
    "state.json without weights": (lambda p: edit_meta(p, lambda m: {k: v for k, v in m.items() if k != "weights"}),
                                   True, "weights must record bytes and sha256"),
    "step is a string": (lambda p: edit_meta(p, lambda m: {**m, "step": "2"}), True, "step must be an integer"),
    "weights are not safetensors": (lambda p: (p / "state.safetensors").write_bytes(b"\x00" * 64), True,
                                    "is not a safetensors file"),
    "bad RNG tensor": (lambda p: edit_tensors(p, lambda t: {**t, "rng/rank0/state": torch.zeros(3, dtype=torch.uint8)}),
                       True, "RNG state 'state' has dtype torch.uint8 and shape \\(3,\\)"),
    "manifest is a list": (lambda p: (p / "manifest.json").write_text("[]"), False, "does not list state.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoint_is_refused_and_state_untouched(run, case):
    paths, fresh = run
    damage, rehashed, message = CASES[case]
    damage(paths[-1])
    if rehashed:
        rehash(paths[-1])
    state = fresh()
    before = weights(state)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(paths[-1], state)
    after = weights(state)
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and state.step == 0, "state was touched"


def test_resume_falls_back_to_the_previous_good_checkpoint(run, capsys):
    paths, fresh = run
    edit_meta(paths[-1], lambda m: {**m, "images_seen": 99})  # the newest is damaged (same size)
    result = run_resilient(fresh(), 3, checkpoint_root=paths[0].parent, resume=True)
    assert result.resumed_from == paths[0]
    assert [p for p, _ in result.skipped] == [paths[-1]] and "does not match" in result.skipped[0][1]
    assert result.state.step == 3
    result.report_start_and_stop()
    out = capsys.readouterr().out
    assert f"skipped damaged checkpoint {paths[-1]}" in out and "the newest checkpoint that verifies" in out


def test_resume_with_every_checkpoint_damaged_is_an_error(run):
    paths, fresh = run
    for p in paths:
        (p / "state.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies \\(2 damaged\\)"):
        run_resilient(fresh(), 3, checkpoint_root=paths[0].parent, resume=True)


def test_a_killed_save_leaves_nothing_behind_after_the_next_save(run):
    paths, fresh = run
    root = paths[0].parent
    stale = root / ".step-00000003.tmp-k1ll3d"  # what a kill -9 during save_checkpoint leaves
    stale.mkdir()
    (stale / "state.safetensors").write_bytes(b"half")
    state = fresh()
    load_checkpoint(paths[-1], state)
    train_step(state)
    save_checkpoint(state, root)
    assert not stale.exists()
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000002", "step-00000003"]


def test_version_1_checkpoints_still_load(run):
    """Written before the manifest: the weights hash inside state.json is still checked."""
    paths, fresh = run
    (paths[-1] / "manifest.json").unlink()
    edit_meta(paths[-1], lambda m: {**m, "version": 1})
    state = fresh()
    assert load_checkpoint(paths[-1], state)["step"] == 2 and state.step == 2
    (paths[-1] / "state.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        load_checkpoint(paths[-1], fresh())


def test_non_finite_weights_are_never_checkpointed(run):
    """An update can overflow a weight with finite gradients: the save refuses and names the last good one."""
    from sfd_fast.core.faults import NonFiniteError, check_health

    paths, fresh = run
    state = fresh()
    load_checkpoint(paths[-1], state)
    with torch.no_grad():
        next(state.generator.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match=f"generator.*non-finite; the last good checkpoint is .*{paths[-1].name}"):
        save_checkpoint(state, paths[0].parent)
    assert [p.name for p in list_checkpoints(paths[0].parent)] == [p.name for p in paths]
    with pytest.raises(NonFiniteError, match="generator weights became non-finite"):
        check_health(state)
