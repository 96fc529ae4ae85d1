"""Interrupted runs: SIGTERM saves a loadable checkpoint and exits cleanly; --resume continues."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import torch

from sfd_fast import SFDConfig, SFDState, save_denoiser
from sfd_fast.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from sfd_fast.train.resilient import run_resilient

CFG = SFDConfig(batch_size=2, forget_batch_size=1, lr_gen=1e-3, lr_fake=1e-3)


def test_signal_in_process_saves_then_resume_matches_uninterrupted(tiny_teacher, tmp_path):
    straight = run_resilient(SFDState.create(CFG, copy.deepcopy(tiny_teacher)), 4, log_every=1)

    def kill_at_2(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    first = run_resilient(SFDState.create(CFG, copy.deepcopy(tiny_teacher)), 4, checkpoint_root=tmp_path,
                          log_every=1, on_log=kill_at_2)
    assert first.interrupted and first.state.step == 2 and first.checkpoint.name == "step-00000002"
    assert signal.getsignal(signal.SIGTERM) is before, "the run must give the old signal handler back"

    second = run_resilient(SFDState.create(CFG, copy.deepcopy(tiny_teacher)), 4, checkpoint_root=tmp_path,
                           resume=True, log_every=1)
    assert second.resumed_from.name == "step-00000002" and not second.interrupted
    assert [r["loss_gen"] for r in second.log] == [r["loss_gen"] for r in straight.log[2:]]
    for a, b in zip(straight.state.generator.parameters(), second.state.generator.parameters()):
        assert torch.equal(a, b)


def test_sigterm_during_cli_distill_leaves_a_loadable_checkpoint(tiny_teacher, tmp_path):
    save_denoiser(tiny_teacher, tmp_path / "teacher")
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "sfd_fast.cli", "distill", "--teacher", str(tmp_path / "teacher"),
           "--out", str(tmp_path / "out"), "--steps", "100000", "--checkpoint-dir", str(ckpt),
           "--checkpoint-every", "2", "--keep-last", "2", "--set", "batch_size=2", "--set", "forget_batch_size=1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(ckpt):  # the run is inside its training loop
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err  # interrupted is not success (cli.args.EXIT_INTERRUPTED)
    assert "interrupted at step" in out and "--resume" in out
    last = latest_checkpoint(ckpt)
    assert len(list_checkpoints(ckpt)) <= 2
    saved_config = SFDConfig.from_dict(json.loads((last / "state.json").read_text())["config"])
    state = SFDState.create(saved_config, tiny_teacher)
    meta = load_checkpoint(last, state)
    assert state.step == meta["step"] >= 2
