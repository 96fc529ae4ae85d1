"""Text-to-image SFD on 2 gloo ranks (CPU): DDP keeps the replicas equal with bf16 master weights and
gradient checkpointing, and `distill --pipeline` under torchrun writes its outputs once (rank 0)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")

from sfd_fast.models.tiny_sd import build_tiny_pipeline  # noqa: E402


def _worker(rank: int, world: int, ports: tuple[int, int], pipe_dir: str, out: str) -> None:
    from sfd_fast import train_step
    from sfd_fast.cli.main import main
    from sfd_fast.core.prompts import ConceptSpec
    from sfd_fast.models.sd_pipeline import load_t2i_pipeline
    from sfd_fast.train import distributed
    from sfd_fast.train.text_to_image import T2I_SFD_CONFIG, T2IOptions, build_t2i_state

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), WORLD_SIZE=str(world))
    # Library: per-rank prompts and noise, gradients averaged, replicas stay equal.
    device = distributed.init_from_env("gloo")
    state = None
    try:
        spec = ConceptSpec.from_substitution("brad pitt", "a man", ["a cat", "a car"], templates=("{}",))
        cfg = T2I_SFD_CONFIG.replace(batch_size=1, forget_batch_size=1, lr_gen=1e-3, lr_fake=1e-3)
        state = build_t2i_state(load_t2i_pipeline(pipe_dir), spec, cfg,
                                T2IOptions(trained_precision="bf16", gradient_checkpointing=True), device)
        distributed.distribute_state(state, "ddp")
        start = [p.detach().clone() for p in state.generator.parameters()]
        for options in (None, "fused"):
            train_step(state, options=options)
        weights = torch.cat([p.detach().float().flatten() for p in state.generator.parameters()])
        moved = any(not torch.equal(a, b) for a, b in zip(start, state.generator.parameters()))
        torch.save({"weights": weights, "moved": moved}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown(state)
    # CLI under torchrun's environment: every rank trains, rank 0 writes. A fresh port: the first
    # group's store may still hold the old one, and a rank could reach the closing store (a hang).
    os.environ["MASTER_PORT"] = str(ports[1])
    code = main(["distill", "--pipeline", pipe_dir, "--out", os.path.join(out, "run"), "--forget", "brad pitt",
                 "--override", "a man", "--literal", "--steps", "2", "--set", "batch_size=1",
                 "--set", "forget_batch_size=1", "--checkpoint-every", "1", "--log-every", "1", "--no-progress"])
    assert code == 0, (rank, code)


def test_two_gloo_ranks_t2i_library_and_cli(tmp_path):
    pipe = build_tiny_pipeline(tmp_path / "pipe")
    with socket.socket() as a, socket.socket() as b:  # both held while asking: two different ports
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = (a.getsockname()[1], b.getsockname()[1])
    mp.spawn(_worker, args=(2, ports, str(pipe), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]  # our own files
    assert all(r["moved"] for r in ranks)
    # Each rank drew its own prompts and noise (per-rank RNG): equal weights mean averaged updates.
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert (run / "generator" / "unet").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
