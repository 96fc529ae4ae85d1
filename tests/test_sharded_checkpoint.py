"""Sharded (DCP) checkpoints: bit-exact resume, resume at another world size (2 -> 1, 1 -> 2) on real
gloo ranks, damage and foreign configs refused with the state untouched, kill -9 mid-save, and the
converter to the plain generator folder."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet, train_step
from sfd_fast.io.atomic import CheckpointError, load_tensors, save_tensors
from sfd_fast.train import sharded_checkpoint as sc
from step_asserts import adam_noise_envelope

CFG = SFDConfig(batch_size=2, forget_batch_size=1, lr_gen=1e-3, lr_fake=1e-3)
K, M = 2, 2  # steps before the checkpoint, steps after it


def _teacher():
    torch.manual_seed(0)
    return EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).eval()


def _full(module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in module.named_parameters()}


def _weights(state) -> dict[str, torch.Tensor]:
    from sfd_fast.train.distributed import unwrap

    return {f"{m}/{k}": v for m in sc.MODULES for k, v in _full(unwrap(getattr(state, m))).items()}


def _full_adam(state) -> dict[str, torch.Tensor]:
    """Both optimizers' state, full tensors keyed by parameter name (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from sfd_fast.train.distributed import unwrap

    out = {}
    for name, mod in sc.OPTIMIZERS.items():
        sd = get_optimizer_state_dict(unwrap(getattr(state, mod)), getattr(state, name),
                                      options=StateDictOptions(full_state_dict=True))
        for fqn, entry in sd["state"].items():
            out.update({f"{name}/{fqn}/{k}": v.clone() for k, v in entry.items() if torch.is_tensor(v)})
    return out


def _set_full_adam(state, tensors: dict[str, torch.Tensor]) -> None:
    """The reference route: put full Adam tensors on a plain state's parameters by name (no DCP)."""
    for name, mod in sc.OPTIMIZERS.items():
        opt = getattr(state, name)
        for fqn, p in getattr(state, mod).named_parameters():
            entry = {k.rsplit("/", 1)[1]: v.clone() for k, v in tensors.items() if k.startswith(f"{name}/{fqn}/")}
            if entry:
                opt.state[p] = entry


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


# --------------------------------------------------------------------------- one process

def test_sharded_save_load_is_bit_exact_and_damage_is_refused(tmp_path):
    state = SFDState.create(CFG, _teacher())
    for _ in range(K):
        train_step(state)
    first = sc.save_sharded_checkpoint(state, tmp_path, keep_last=2)
    train_step(state)
    second = sc.save_sharded_checkpoint(state, tmp_path, keep_last=2)
    after = train_step(state)
    assert [p.name for p in sc.list_checkpoints(tmp_path)] == [first.name, second.name]

    resumed = SFDState.create(CFG, _teacher())
    sc.load_sharded_checkpoint(second, resumed)
    again = train_step(resumed)
    assert torch.equal(again["loss_gen"], after["loss_gen"]) and resumed.step == state.step
    _assert_equal(_weights(resumed), _weights(state), "resumed vs uninterrupted")  # tolerance 0: same process

    # keep-last-N: a third save drops the oldest.
    third = sc.save_sharded_checkpoint(resumed, tmp_path, keep_last=2)
    assert [p.name for p in sc.list_checkpoints(tmp_path)] == [second.name, third.name]

    # A foreign config, a flipped byte in a DCP shard, a missing manifest: refused, state untouched.
    fresh = SFDState.create(CFG, _teacher())
    before = _weights(fresh)
    other = SFDState.create(CFG.replace(lr_gen=5e-4), _teacher())
    with pytest.raises(CheckpointError, match="different config.*lr_gen"):
        sc.load_sharded_checkpoint(third, other)
    shard = next(p for p in second.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* does not match the recorded .*nothing was loaded"):
        sc.load_sharded_checkpoint(second, fresh)
    _assert_equal(_weights(fresh), before, "a refused checkpoint changed the state")
    found, skipped = sc.resume_latest(tmp_path, fresh)  # the newest that verifies
    assert found == third and not skipped
    (third / sc.MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing .*nothing was loaded"):
        sc.load_sharded_checkpoint(third, other)
    found, skipped = sc.resume_latest(tmp_path, SFDState.create(CFG, _teacher()))
    assert found is None and [p for p, _ in skipped] == [third, second]


def test_converter_writes_the_plain_generator_folder(tmp_path):
    from sfd_fast.models.networks import OneStepGenerator, load_generator

    state = SFDState.create(CFG, _teacher())
    train_step(state)
    path = sc.save_sharded_checkpoint(state, tmp_path / "ckpt")
    template = OneStepGenerator(_teacher(), CFG.sigma_init)
    out = sc.export_generator(path, tmp_path / "generator", template)
    loaded = load_generator(out)
    _assert_equal(dict(loaded.named_parameters()), dict(state.generator_ema.named_parameters()), "exported EMA")
    z, c = torch.randn(2, *state.image_shape), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(z, c), state.generator_ema.eval()(z, c))
    wrong = OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name("demo"))), CFG.sigma_init)
    with pytest.raises(CheckpointError, match="template does not match"):
        sc.export_generator(path, tmp_path / "g2", wrong)


# --------------------------------------------------------------------------- other world sizes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _continue_under_ddp(ref, rank: int) -> dict[str, torch.Tensor]:
    """The reference continuation: ``ref`` (step K) under DDP with the documented resume seed, M steps; its weights."""
    from sfd_fast.train import distributed

    distributed.distribute_state(ref, "ddp")
    seed = sc.resume_seed(CFG.seed, K, rank)
    ref.rng.manual_seed(seed)
    torch.manual_seed(seed)
    for _ in range(M):
        train_step(ref)
    return _weights(ref)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    from sfd_fast.train import distributed
    from sfd_fast.train.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    results = {}
    # 1 -> 2, reference route (no DCP): the whole-state checkpoint of the 1-process run, loaded
    # before the group exists, continued under DDP; one FSDP2 unit per network runs the same
    # autograd graph as DDP (tests/test_fsdp.py: bitwise-equal gradients).
    ref = SFDState.create(CFG, _teacher())
    load_checkpoint(os.path.join(out, "plain", f"step-{K:08d}"), ref)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    device = distributed.init_from_env("gloo")
    try:
        ref_weights = _continue_under_ddp(ref, rank)
        # 1 -> 2 through the sharded checkpoint (DCP re-shards one process's file onto 2 ranks).
        state = SFDState.create(CFG, _teacher(), device)
        distributed.distribute_state(state, "fsdp", distributed.FSDPOptions(per_block=False))
        with pytest.raises(CheckpointError, match="written by 1 ranks, this run has 2, and allow_reshard=False"):
            sc.load_sharded_checkpoint(os.path.join(out, "one", f"step-{K:08d}"), state, allow_reshard=False)
        with pytest.raises(CheckpointError, match="written by 1 ranks, this run has 2"):  # the whole-state path
            load_checkpoint(os.path.join(out, "plain", f"step-{K:08d}"), state)
        sc.load_sharded_checkpoint(os.path.join(out, "one", f"step-{K:08d}"), state)
        for _ in range(M):
            train_step(state)
        got = _weights(state)
        results["one_to_two_max_diff"] = max((got[k] - v).abs().max().item() for k, v in ref_weights.items())
        ref.fake, ref.generator = distributed.unwrap(ref.fake), distributed.unwrap(ref.generator)  # drop DDP

        # 2 ranks from scratch: K steps, a sharded checkpoint, plus the full state for the 2 -> 1 reference.
        state = SFDState.create(CFG, _teacher(), device)
        distributed.distribute_state(state, "fsdp")
        for _ in range(K):
            train_step(state)
        sc.save_sharded_checkpoint(state, os.path.join(out, "two"))
        full = {**{f"w/{k}": v for k, v in _weights(state).items()}, **{f"a/{k}": v for k, v in _full_adam(state).items()}}
        if rank == 0:
            save_tensors(full, os.path.join(out, "two_full.safetensors"), {"images_seen": state.images_seen})
        # Same world size: bit-exact (every rank gets its own RNG stream back).
        for _ in range(M):
            train_step(state)
        uninterrupted = _weights(state)
        sc.load_sharded_checkpoint(os.path.join(out, "two", f"step-{K:08d}"), state)
        for _ in range(M):
            train_step(state)
        results["two_to_two_equal"] = all(torch.equal(v, uninterrupted[k]) for k, v in _weights(state).items())
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        distributed.shutdown()


def _full_onto(state, full: dict[str, torch.Tensor], images_seen: int) -> None:
    """The reference route (no DCP): full weights and Adam moments put on a plain state by name."""
    for mod in sc.MODULES:
        getattr(state, mod).load_state_dict({k[len(f"w/{mod}/"):]: v for k, v in full.items()
                                             if k.startswith(f"w/{mod}/")}, strict=False)
    _set_full_adam(state, {k[2:]: v for k, v in full.items() if k.startswith("a/")})
    state.step, state.images_seen = K, images_seen


def _worker_four(rank: int, world: int, port: int, out: str) -> None:
    """2 -> 4: the 2-rank sharded checkpoint on 4 FSDP2 ranks vs the same full state continued under 4-rank DDP."""
    import json

    from sfd_fast.train import distributed

    torch.set_num_threads(1)
    full, meta = load_tensors(os.path.join(out, "two_full.safetensors"))
    ref = SFDState.create(CFG, _teacher())
    _full_onto(ref, full, meta["images_seen"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    device = distributed.init_from_env("gloo")
    try:
        want = _continue_under_ddp(ref, rank)
        state = SFDState.create(CFG, _teacher(), device)
        distributed.distribute_state(state, "fsdp", distributed.FSDPOptions(per_block=False))
        sc.load_sharded_checkpoint(os.path.join(out, "two", f"step-{K:08d}"), state)
        for _ in range(M):
            train_step(state)
        got = _weights(state)
        diffs = {k: (got[k] - v).abs().max().item() for k, v in want.items()}
        noise = [v for k, v in diffs.items() if k.endswith("to_k.bias")]
        rest = {k: v / (1e-6 + 1e-5 * want[k].abs().max().item()) for k, v in diffs.items() if not k.endswith("to_k.bias")}
        with open(os.path.join(out, f"four-rank{rank}.json"), "w") as f:
            json.dump({"worst_rel": max(rest.values()), "worst_key": max(rest, key=rest.get),
                       "key_bias_max": max(noise), "step": state.step}, f)
    finally:
        distributed.shutdown()


@pytest.mark.slow  # one spawn of 2 ranks + 1-process runs: ~2 min on 2 loaded cores, then 4 ranks
def test_resume_at_another_world_size(tmp_path):
    """2 -> 1 and 1 -> 2 continue exactly (tolerance 0) like the same continuation reached without DCP;
    2 -> 4 within DDP-vs-FSDP2 rounding at 4 ranks.

    An uninterrupted run at the *old* world size cannot be the reference: W ranks draw W noise
    streams and average W per-rank batches, so another W is another run. The reference is the
    uninterrupted continuation at the *new* world size from the same state, reached without DCP
    (2 -> 1: the full weights and Adam moments handed over in memory; 1 -> 2: the whole-state
    checkpoint continued under DDP), the RNG seeded by the documented rule (resume_seed). Both
    routes then run the same arithmetic on the same bits: 2 -> 1 must be bitwise equal, 1 -> 2
    within 1e-6 (0 expected; FSDP2 with one unit per network has DDP's gradients bit for bit).
    """
    import json

    from sfd_fast.train.checkpoint import save_checkpoint

    one = SFDState.create(CFG, _teacher())
    for _ in range(K):
        train_step(one)
    sc.save_sharded_checkpoint(one, tmp_path / "one")
    save_checkpoint(one, tmp_path / "plain")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["two_to_two_equal"], r  # same world size: bit-exact
        # 1 -> 2 against DDP from the whole-state checkpoint: the same gradients bit for bit (one
        # unit per network), so 0 is expected; 1e-6 would still be far below one Adam step (1e-3).
        assert got["one_to_two_max_diff"] <= 1e-6, (r, got)

    # 2 -> 1: a plain one-process state from the 2-rank sharded checkpoint ...
    resumed = SFDState.create(CFG, _teacher())
    sc.load_sharded_checkpoint(tmp_path / "two" / f"step-{K:08d}", resumed)
    full, meta = load_tensors(tmp_path / "two_full.safetensors")
    _assert_equal(_weights(resumed), {k[2:]: v for k, v in full.items() if k.startswith("w/")}, "2 -> 1 weights")
    _assert_equal(_full_adam(resumed), {k[2:]: v for k, v in full.items() if k.startswith("a/")}, "2 -> 1 Adam")
    assert (resumed.step, resumed.images_seen) == (K, meta["images_seen"])
    # ... and the reference: the same full tensors put on a fresh state without DCP.
    ref = SFDState.create(CFG, _teacher())
    _full_onto(ref, full, meta["images_seen"])
    seed = sc.resume_seed(CFG.seed, K, 0)
    ref.rng.manual_seed(seed)
    for s in (resumed, ref):
        torch.manual_seed(seed)
        for _ in range(M):
            train_step(s)
    _assert_equal(_weights(resumed), _weights(ref), "2 -> 1 continuation")

    # 2 -> 4: DCP re-shards the 2-rank checkpoint onto 4 FSDP2 ranks; the reference is the same full
    # state continued under 4-rank DDP. At 4 ranks gloo's all-reduce (DDP) and reduce-scatter (FSDP2)
    # sum 4 gradients in different orders (with 2, a + b is exact either way), so last bits differ:
    # rtol 1e-5 + atol 1e-6 as tests/test_fsdp.py's 4-rank test, the attention key biases (analytically
    # zero gradient, Adam-amplified rounding noise) within the bound of 2 runs' M Adam steps.
    mp.spawn(_worker_four, args=(4, _free_port(), str(tmp_path)), nprocs=4, join=True)
    for r in range(4):
        got = json.loads((tmp_path / f"four-rank{r}.json").read_text())
        assert got["step"] == K + M and got["worst_rel"] <= 1.0, (r, got)
        assert got["key_bias_max"] <= adam_noise_envelope(CFG, M), (r, got)


# --------------------------------------------------------------------------- kill -9

_SAVE_LOOP = """
import os, sys, torch
from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet
from sfd_fast.train import distributed, sharded_checkpoint as sc
torch.set_num_threads(1)
root = sys.argv[1]
device = distributed.init_from_env("gloo")
with open(os.path.join(root, f"pid-rank{distributed.rank()}"), "w") as f:
    f.write(str(os.getpid()))
torch.manual_seed(0)
cfg = SFDConfig(batch_size=2, forget_batch_size=1)
state = SFDState.create(cfg, EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).eval(), device)
distributed.distribute_state(state, "fsdp")
while True:  # save after save until killed
    state.step += 1
    sc.save_sharded_checkpoint(state, root, keep_last=2)
    if distributed.is_main():
        with open(os.path.join(root, "saved.txt"), "a") as f:
            f.write(f"{state.step}\\n")
"""


@pytest.mark.slow  # torchrun with 2 ranks, killed mid-save: ~40 s
def test_kill_9_during_a_sharded_save_leaves_the_previous_checkpoint_usable(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    script = tmp_path / "save_loop.py"
    script.write_text(_SAVE_LOOP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(root)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def kill_all():  # both ranks (their own sessions under torchrun), then the agent: only what we started
        for r in range(2):
            pid_file = root / f"pid-rank{r}"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    killed_mid_save = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            saved = (root / "saved.txt").read_text().split() if (root / "saved.txt").exists() else []
            if saved:  # at least one complete checkpoint: now catch a save in flight
                with contextlib.suppress(FileNotFoundError):  # a save may finish between two calls
                    tmps = [p for p in root.iterdir() if p.name.startswith(".step-") and p.is_dir()]
                    if any(q.suffix == ".distcp" for t in tmps for q in t.iterdir()):
                        kill_all()  # kill -9 while the shards are on disk and the manifest is not
                        killed_mid_save = tmps
                        break
            time.sleep(0.001)
    finally:
        kill_all()
        _, err = proc.communicate(timeout=60)
    assert killed_mid_save, f"no save was caught in flight; torchrun said: {err.decode()[-2000:]}"
    assert any(t.exists() for t in killed_mid_save), "the kill did not interrupt the save"
    complete = sc.list_checkpoints(root)
    assert complete, "no complete checkpoint survived"
    state = SFDState.create(SFDConfig(batch_size=2, forget_batch_size=1), _teacher())
    found, skipped = sc.resume_latest(root, state)  # 2 -> 1: a plain process reads the 2-rank shards
    assert found == complete[-1] and not skipped and state.step == int(found.name.split("-")[1])
    sc.save_sharded_checkpoint(state, root)  # the next save clears the killed save's temporary folder
    assert not [p for p in root.iterdir() if p.name.startswith(".step-")]
