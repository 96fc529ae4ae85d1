"""FSDP2 (``fully_shard``) SFD on real gloo process groups (CPU): the sharded run trains exactly like DDP
and like one process that averages the ranks' gradients; the non-finite guard decides the same on every
rank; ``frozen()`` keeps FSDP2's sharded flags (the first attempt's failure); bad input is refused."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet, train_step
from sfd_fast.io.atomic import load_tensors, save_tensors
from step_asserts import adam_noise_envelope

# As tests/test_distributed.py: no value clipping (the thread reference averages in the optimizer's
# pre-step hook, after which a clip would apply), lr large enough that 3 steps move every weight.
CFG = SFDConfig(batch_size=2, forget_batch_size=1, lr_gen=1e-3, lr_fake=1e-3, grad_clip_value=None)
STEPS = 3


def _teacher():
    torch.manual_seed(0)
    return EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(module) -> dict[str, torch.Tensor]:
    """Full weights of a plain or FSDP2-sharded module (a collective for DTensors), by name."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in module.named_parameters()}


def _jobs():
    from sfd_fast.train.distributed import FSDPOptions

    return {  # name: (mode, FSDPOptions, step options)
        "ddp": ("ddp", None, None),
        "fsdp": ("fsdp", FSDPOptions(per_block=False), None),      # one unit per network
        "fsdp-blocks": ("fsdp", FSDPOptions(), None),              # one unit per UNet block (the default)
        "fsdp-blocks-fused": ("fsdp", FSDPOptions(), "fused"),     # the fast path
        "fsdp-bf16": ("fsdp", FSDPOptions(param_dtype="bf16", activation_checkpointing=True, teacher="shard"), None),
    }


def _run(job: str, device) -> tuple[dict[str, torch.Tensor], dict]:
    """One job on this rank: build, distribute, train STEPS steps; (full weights, metrics)."""
    from sfd_fast.train import distributed

    mode, fsdp, options = _jobs()[job]
    state = SFDState.create(CFG, _teacher(), device)
    distributed.distribute_state(state, mode, fsdp)
    metrics = [distributed.reduce_metrics(train_step(state, options=options)) for _ in range(STEPS)]
    weights = {f"gen/{k}": v for k, v in _full(distributed.unwrap(state.generator)).items()}
    weights.update({f"ema/{k}": v for k, v in _full(state.generator_ema).items()})
    weights.update({f"fake/{k}": v for k, v in _full(distributed.unwrap(state.fake)).items()})
    return weights, {"loss_gen": [float(m["loss_gen"]) for m in metrics],
                     "loss_fake": [float(m["loss_fake"]) for m in metrics]}


def _guard_job(rank: int, device) -> dict:
    """Rank 1's teacher outputs NaN: its whole generator batch is masked (a finite loss, finite zero
    gradients), so only the cross-rank agreement in check_finite makes rank 0 skip the update too."""
    from sfd_fast.train import distributed

    state = SFDState.create(CFG, _teacher(), device)
    if rank == 1:  # after create: fake score and G are copies of the clean teacher
        with torch.no_grad():
            state.teacher.unet.conv_out.bias.fill_(float("nan"))
    distributed.distribute_state(state, "fsdp")
    gen_before, fake_before = _full(state.generator), _full(state.fake)
    metrics = train_step(state)
    gen_after, fake_after = _full(state.generator), _full(state.fake)
    return {"skipped_gen": int(metrics["skipped_gen"]), "skipped_fake": int(metrics["skipped_fake"]),
            "gen_moved": any(not torch.equal(gen_before[k], gen_after[k]) for k in gen_before),
            "fake_moved": any(not torch.equal(fake_before[k], fake_after[k]) for k in fake_before)}


def _frozen_job(device) -> dict:
    """The first attempt's order: ``frozen()`` exited between the fake score's forward and backward
    (the root unit still holds FSDP2's unsharded parameters then), followed by a fake-score step."""
    from sfd_fast.core.grads import frozen
    from sfd_fast.train import distributed

    state = SFDState.create(CFG, _teacher(), device)
    distributed.distribute_state(state, "fsdp")
    sharded = list(state.fake.parameters())
    x = torch.randn(3, *state.image_shape, requires_grad=True)
    sigma, c = torch.ones(3), torch.zeros(3, dtype=torch.long)
    with frozen(state.fake):
        y = state.fake(x, sigma, c)
    y.square().mean().backward()
    flags_after = sorted({p.requires_grad for p in sharded})
    loss = state.fake(x.detach(), sigma, c).square().mean()  # what the next fake-score step computes
    has_grad_fn = loss.grad_fn is not None
    loss.backward()
    return {"flags_after": flags_after, "has_grad_fn": has_grad_fn,
            "weight_grads": all(p.grad is not None for p in sharded), "input_grad": x.grad is not None}


def _worker(rank: int, world: int, port: int, out: str, jobs: list[str]) -> None:
    import json

    from sfd_fast.train import distributed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    device = distributed.init_from_env("gloo")
    try:
        for job in jobs:
            if job in ("guard", "frozen"):
                result = _guard_job(rank, device) if job == "guard" else _frozen_job(device)
                with open(os.path.join(out, f"{job}-rank{rank}.json"), "w") as f:
                    json.dump(result, f)
                continue
            weights, meta = _run(job, device)
            save_tensors(weights, os.path.join(out, f"{job}-rank{rank}.safetensors"), meta)
    finally:
        distributed.shutdown()


def _spawn(world: int, out, jobs: list[str]) -> dict[str, list]:
    mp.spawn(_worker, args=(world, _free_port(), str(out), jobs), nprocs=world, join=True)
    return {job: [load_tensors(out / f"{job}-rank{r}.safetensors") for r in range(world)]
            for job in jobs if job not in ("guard", "frozen")}


def _thread_reference(world: int) -> dict[str, torch.Tensor]:
    """tests/test_distributed.py's one-process reference (``world`` states, gradients averaged)."""
    from test_distributed import _thread_reference as reference

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' intra-op threading: identical reductions
    try:
        names = [n for n, _ in SFDState.create(CFG, _teacher()).generator.named_parameters()]
        return {f"gen/{n}": p for n, p in zip(names, reference(world), strict=True)}
    finally:
        torch.set_num_threads(threads)


def _assert_close_to_reference(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                               noise_driven: tuple[str, ...] = (), atol: float = 1e-6) -> None:
    """rtol 1e-5 as the DDP test; weights named in ``noise_driven`` only within 2 runs' Adam-step envelope
    (``step_asserts.adam_noise_envelope``)."""
    assert reference.keys() <= weights.keys()
    for k, p in reference.items():
        diff = (weights[k] - p).abs().max().item()
        if k.endswith(noise_driven):
            assert diff <= adam_noise_envelope(CFG, STEPS), (k, diff)
            continue
        torch.testing.assert_close(weights[k], p, rtol=1e-5, atol=atol, msg=f"{k}: max abs diff {diff:.3g}")


def _assert_same_generator(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Both weight sets as generators: G(z, c) within 1e-5 of each other (relative to the largest output).

    Covers the weights the parameter checks leave to an envelope: whatever Adam made of the attention
    key biases' rounding noise, softmax ignores it, so the two generators are the same function.
    """
    def generator(ws):
        g = SFDState.create(CFG, _teacher()).generator.eval()
        loaded = g.load_state_dict({k[len("gen/"):]: v for k, v in ws.items() if k.startswith("gen/")}, strict=False)
        assert not loaded.unexpected_keys and not set(loaded.missing_keys) & dict(g.named_parameters()).keys()
        return g

    gen = torch.Generator().manual_seed(3)
    z = torch.randn(8, *SFDState.create(CFG, _teacher()).image_shape, generator=gen)
    c = torch.arange(8) % 10
    with torch.no_grad():
        got, want = generator(weights)(z, c), generator(reference)(z, c)
    err = float((got - want).abs().max()) / float(want.abs().max())
    assert err <= 1e-5, f"generators differ by {err:.3g} relative"


def _moved(weights: dict[str, torch.Tensor]) -> None:
    start = dict(SFDState.create(CFG, _teacher()).generator.named_parameters())
    assert all(not torch.equal(weights[f"gen/{k}"], v) for k, v in start.items() if v.numel() > 1), \
        "FSDP2 left some generator weights untouched: a gradient or a step is missing"


@pytest.mark.slow  # one spawn of 2 processes, 6 jobs of 3 steps: ~2-3 min on 2 loaded cores
def test_fsdp_two_ranks_equals_ddp_and_one_process(tmp_path):
    import json

    jobs = ["frozen", "fsdp", "ddp", "fsdp-blocks", "fsdp-blocks-fused", "fsdp-bf16", "guard"]
    runs = _spawn(2, tmp_path, jobs)
    for job, ((r0, _), (r1, _)) in runs.items():
        for k in r0:  # full weights gathered on each rank: one model
            assert torch.equal(r0[k], r1[k]), f"{job}: ranks disagree at {k}"
    (fsdp, _), (ddp, _) = runs["fsdp"][0], runs["ddp"][0]
    _moved(fsdp)
    # One unit per network: the same autograd graph as DDP, so the same gradients bit for bit
    # (measured: 145 of 145 fake-score gradients equal); 1e-5 as the DDP test allows.
    for k in fsdp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6, msg=f"FSDP2 vs DDP at {k}")
    _assert_close_to_reference(fsdp, _thread_reference(2))

    # One unit per block: FSDP2's per-unit autograd hooks change the order in which autograd sums
    # the gradient contributions of tensors used twice (the UNet's skip connections), so the
    # down blocks' gradients differ in the last bits (measured: the stem and down blocks differ,
    # up and mid blocks are bitwise equal; a 1-rank group shows the same, so it is not the
    # reduction). SiD's generator gradient is the difference of two near-identical networks'
    # input Jacobians (teacher minus fake), which amplifies such bits, so 5e-6 absolute rather
    # than 1e-6. Attention key biases are left out: their gradient is analytically zero (softmax
    # ignores q.b_k), so it is pure rounding noise that Adam (beta1 = 0) turns into lr-sized steps
    # of random sign; any other arithmetic (a different GPU, a different torch) does the same.
    (blocks, _), (fused, _) = runs["fsdp-blocks"][0], runs["fsdp-blocks-fused"][0]
    _moved(blocks)
    for k in blocks:
        if k.endswith("to_k.bias"):  # noise-driven: only inside the envelope of 2 runs' Adam steps
            assert (blocks[k] - ddp[k]).abs().max() <= adam_noise_envelope(CFG, STEPS), k
            continue
        torch.testing.assert_close(blocks[k], ddp[k], rtol=1e-5, atol=5e-6, msg=f"per-block FSDP2 vs DDP at {k}")
    _assert_same_generator(blocks, ddp)
    for k in blocks:  # the fast path (fp32, no change of sampling) is the reference path under FSDP2 too
        torch.testing.assert_close(fused[k], blocks[k], rtol=1e-5, atol=1e-6, msg=f"fast vs reference path at {k}")

    # bf16 compute (MixedPrecisionPolicy), activation checkpointing, sharded teacher: the first step's
    # losses are those of fp32 to bf16's resolution (same weights; 8 mantissa bits ~ 0.4% per op).
    (_, bf16), (_, fp32) = runs["fsdp-bf16"][0], runs["fsdp-blocks"][0]
    for name in ("loss_fake", "loss_gen"):
        assert abs(bf16[name][0] - fp32[name][0]) <= 0.03 * abs(fp32[name][0]), (name, bf16[name], fp32[name])
        assert bf16[name][0] != fp32[name][0], "bf16 compute was not used"
    _moved(runs["fsdp-bf16"][0][0])

    for r in range(2):  # the first attempt's failure, fixed in frozen()
        assert json.loads((tmp_path / f"frozen-rank{r}.json").read_text()) == {
            "flags_after": [True], "has_grad_fn": True, "weight_grads": True, "input_grad": True}
    guard = [json.loads((tmp_path / f"guard-rank{r}.json").read_text()) for r in range(2)]
    for r, g in enumerate(guard):
        assert g["skipped_gen"] == 1 and g["skipped_fake"] == 0, (r, g)
        assert not g["gen_moved"] and g["fake_moved"], (r, g)


@pytest.mark.slow  # 4 processes on 2 cores: ~2 min
def test_fsdp_four_ranks_equals_one_process(tmp_path):
    runs = _spawn(4, tmp_path, ["fsdp"])
    for r in range(1, 4):
        for k, v in runs["fsdp"][0][0].items():
            assert torch.equal(v, runs["fsdp"][r][0][k]), f"rank {r} disagrees at {k}"
    _moved(runs["fsdp"][0][0])
    # 4 ranks: gloo sums 4 gradients in its own order, the reference left to right, so the sums
    # differ in the last bits (with 2 ranks a+b is exact either way). That is harmless except for
    # the attention key biases, whose gradient is analytically zero (rounding noise that Adam,
    # beta1 = 0, turns into lr-sized steps of random sign): those only stay in the step envelope.
    # The rest: 5e-6 absolute as for per-block units (the same mechanism: last-bit gradient
    # differences, amplified by SiD's teacher-minus-fake Jacobian difference).
    reference = _thread_reference(4)
    _assert_close_to_reference(runs["fsdp"][0][0], reference, noise_driven=("to_k.bias",), atol=5e-6)
    _assert_same_generator(runs["fsdp"][0][0], reference)  # the key biases included: the same function


def test_fsdp_without_a_process_group_is_refused(tiny_teacher):
    from sfd_fast.train.distributed import FSDPOptions, distribute_state

    state = SFDState.create(CFG, tiny_teacher)
    with pytest.raises(RuntimeError, match="'fsdp' needs a torch.distributed process group: launch with torchrun"):
        distribute_state(state, "fsdp")
    with pytest.raises(ValueError, match="FSDPOptions were given with mode='ddp'"):
        distribute_state(state, "ddp", FSDPOptions())
    with pytest.raises(ValueError, match="FSDPOptions.teacher='zero'; allowed"):
        FSDPOptions(teacher="zero")
    assert state.generator.__class__.__name__ == "OneStepGenerator"  # untouched


def test_cli_fsdp_without_torchrun_is_one_line_exit_2(tmp_path, tiny_teacher, monkeypatch, capsys):
    from sfd_fast.cli.main import main
    from sfd_fast.models.networks import save_denoiser

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    save_denoiser(tiny_teacher, tmp_path / "teacher")
    code = main(["distill", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "out"), "--steps", "1",
                 "--distributed", "fsdp", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    assert "--distributed fsdp" in err and "needs torchrun" in err
    assert not (tmp_path / "out").exists()


def _t2i_worker(rank: int, world: int, port: int, pipe_dir: str, out: str) -> None:
    from sfd_fast.core.prompts import ConceptSpec
    from sfd_fast.models.sd_pipeline import load_t2i_pipeline
    from sfd_fast.train import distributed
    from sfd_fast.train.text_to_image import T2I_SFD_CONFIG, T2IOptions, build_t2i_state

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    device = distributed.init_from_env("gloo")
    try:
        spec = ConceptSpec.from_substitution("brad pitt", "a man", ["a cat", "a car"], templates=("{}",))
        cfg = T2I_SFD_CONFIG.replace(batch_size=1, forget_batch_size=1, lr_gen=1e-3, lr_fake=1e-3)
        results = {}
        for name, fsdp in (("fp32", distributed.FSDPOptions()),
                           ("bf16", distributed.FSDPOptions(param_dtype="bf16", activation_checkpointing=True))):
            state = build_t2i_state(load_t2i_pipeline(pipe_dir), spec, cfg, T2IOptions(), device)
            distributed.distribute_state(state, "fsdp", fsdp)
            start = _full(state.generator)
            for options in (None, "fused"):  # the reference and the fast path, one step each
                train_step(state, options=options)
            end = _full(state.generator)
            results.update({f"{name}/{k}": v for k, v in end.items()})
            results[f"{name}/moved"] = torch.tensor([not torch.equal(start[k], end[k]) for k in start])
        save_tensors(results, os.path.join(out, f"t2i-rank{rank}.safetensors"))
    finally:
        distributed.shutdown()


@pytest.mark.slow  # 2 ranks, tiny SD pipeline, 2 configurations x 2 steps: ~60 s
def test_fsdp_text_to_image_two_ranks(tmp_path):
    pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")
    from sfd_fast.models.tiny_sd import build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    mp.spawn(_t2i_worker, args=(2, _free_port(), str(pipe), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_tensors(tmp_path / f"t2i-rank{r}.safetensors")[0] for r in range(2))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree at {k}"
    for name in ("fp32", "bf16"):  # every generator weight trained, with prompts and CFG through FSDP2
        assert r0[f"{name}/moved"].all(), name
