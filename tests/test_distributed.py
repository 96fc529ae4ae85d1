"""Data-parallel SFD on 2 gloo processes (CPU): DDP averages the trained networks' gradients, so
2 ranks with per-rank batch b train like one process with batch 2b; rank-0 checkpoints resume."""

from __future__ import annotations

import os
import socket
import threading

import pytest
import torch
import torch.multiprocessing as mp

from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet, train_step
from sfd_fast.core.losses import edm_denoising_loss, sfd_sample_weights, sid_generator_loss
from sfd_fast.io.atomic import load_tensors, save_tensors
from sfd_fast.train.distributed import rank_seed

# No value clipping here: clipping is applied after the cross-rank average, so the thread
# reference below (which averages in the optimizer's pre-step hook) would see clipped grads.
CFG = SFDConfig(batch_size=2, forget_batch_size=1, lr_gen=1e-3, lr_fake=1e-3, grad_clip_value=None)
STEPS = 3


def _teacher():
    torch.manual_seed(0)
    return EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).eval()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from sfd_fast.train import distributed
    from sfd_fast.train.checkpoint import load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    device = distributed.init_from_env("gloo")
    state = None
    try:
        state = SFDState.create(CFG, _teacher(), device)
        distributed.distribute_state(state, "ddp")
        metrics = [distributed.reduce_metrics(train_step(state)) for _ in range(STEPS)]
        weights = {f"gen/{i}": p.detach().clone() for i, p in enumerate(state.generator.parameters())}
        ckpt = save_checkpoint(state, os.path.join(out, "ckpt"))
        after = train_step(state)
        save_tensors(weights, os.path.join(out, f"rank{rank}.safetensors"),
                     {"loss_gen": [float(m["loss_gen"]) for m in metrics], "next_loss_gen": float(after["loss_gen"])})
        dist.barrier()
        path = os.path.join(out, "ckpt", f"step-{STEPS:08d}")
        load_checkpoint(path, state)  # every rank restores its own RNG stream
        again = train_step(state)
        assert torch.equal(again["loss_gen"], after["loss_gen"]), (rank, again["loss_gen"], after["loss_gen"])
        assert (ckpt is not None) == (rank == 0)
    finally:
        distributed.shutdown(state)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _thread_reference(world: int, cfg: SFDConfig = CFG) -> list[torch.Tensor]:
    """One process, ``world`` states with the ranks' seeds, grads averaged before every step."""
    states = [SFDState.create(cfg, _teacher()) for _ in range(world)]
    for r, s in enumerate(states):
        s.rng.manual_seed(rank_seed(cfg.seed, r))
    barrier = threading.Barrier(world, timeout=120)

    for name in ("opt_fake", "opt_gen"):
        opts = [getattr(s, name) for s in states]

        def make_hook(r, opts=opts):
            def average(opt, args, kwargs):
                barrier.wait()
                if r == 0:
                    per_rank = [[p for g in o.param_groups for p in g["params"]] for o in opts]
                    for ps in zip(*per_rank):
                        mean = sum(p.grad for p in ps) / world
                        for p in ps:
                            p.grad.copy_(mean)
                barrier.wait()
            return average
        for r, opt in enumerate(opts):
            opt.register_step_pre_hook(make_hook(r))

    errors = []

    def run(s):
        try:
            for _ in range(STEPS):
                train_step(s)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            barrier.abort()
    threads = [threading.Thread(target=run, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return [p.detach() for p in states[0].generator.parameters()]


@pytest.mark.slow  # two spawned processes importing torch+diffusers: ~25 s on 2 idle cores
def test_two_gloo_ranks_match_one_process_with_averaged_gradients(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [load_tensors(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    (w0, m0), (w1, m1) = ranks
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks diverged at {k}: gradients were not all-reduced"
    assert m0["loss_gen"] == m1["loss_gen"], "reduced metrics must agree on every rank"
    # Unreduced per-rank losses differ: each rank drew its own noise and labels.
    assert m0["next_loss_gen"] != m1["next_loss_gen"], "ranks must draw different noise and labels"
    # Same intra-op threading as the workers: Adam with beta1=0 turns reduction-order noise in
    # near-zero gradients into lr-sized steps, so the comparison needs identical reductions.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _thread_reference(2)
    finally:
        torch.set_num_threads(threads)
    for i, p in enumerate(reference):
        torch.testing.assert_close(w0[f"gen/{i}"], p, rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(tmp_path / "ckpt")) == [f"step-{STEPS:08d}"]  # written once, by rank 0


def test_global_batch_loss_is_the_mean_of_rank_batch_losses():
    """Why averaging rank gradients equals one process with the concatenated batch."""
    torch.manual_seed(1)
    nr, nf, shape = 3, 2, (1, 4, 4)
    x, yr, yf = (torch.randn(2 * (nr + nf), *shape) for _ in range(3))
    rank_rows = [list(range(r * nr, (r + 1) * nr)) + list(range(2 * nr + r * nf, 2 * nr + (r + 1) * nf))
                 for r in range(2)]
    w_global = sfd_sample_weights(2 * nr, 2 * nf, 0.3, 100.0)
    w_rank = sfd_sample_weights(nr, nf, 0.3, 100.0)
    sid = lambda rows, w: sid_generator_loss(x[rows], yr[rows], yf[rows], w, alpha=1.2, omega_min=1e-5)[0]
    edm = lambda rows, w: edm_denoising_loss(yr[rows], x[rows], w)[0]
    everything = list(range(2 * (nr + nf)))
    for loss in (sid, edm):
        torch.testing.assert_close(loss(everything, w_global), sum(loss(rows, w_rank) for rows in rank_rows) / 2)


def test_unsupported_modes_are_refused_clearly(tiny_teacher):
    from sfd_fast.train.distributed import distribute_state

    state = SFDState.create(CFG, tiny_teacher)
    with pytest.raises(ValueError, match="unknown distributed mode 'zero3'; allowed: \\('ddp', 'fsdp'\\)"):
        distribute_state(state, "zero3")
    with pytest.raises(RuntimeError, match="'fsdp' needs a torch.distributed process group"):
        distribute_state(state, "fsdp")  # FSDP2 needs torchrun (tests/test_fsdp.py runs it on gloo)
    distribute_state(state, "ddp")  # a single process: nothing to wrap
    assert state.generator.__class__.__name__ == "OneStepGenerator"
