"""The fast path of train_step against the reference path (same seed, same model, tiny config)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from sfd_fast import SFDConfig, SFDState, train_step
from sfd_fast.core.step_options import STEP_PRESETS, StepOptions

CFG = SFDConfig(batch_size=4, forget_batch_size=2)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs / GPU autocast); none here")


def make_state(teacher, config=CFG, device="cpu", perturb_fake=False) -> SFDState:
    """perturb_fake: move psi off the teacher, as mid-training; at init the generator loss is a
    difference of two equal networks, pure rounding noise, and comparing gradients tests nothing."""
    state = SFDState.create(config, copy.deepcopy(teacher), device=device)
    if perturb_fake:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in state.fake.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)
    return state


def run(teacher, options, steps, config=CFG, device="cpu", perturb_fake=False):
    state = make_state(teacher, config, device, perturb_fake)
    metrics = [train_step(state, options=options) for _ in range(steps)]
    return state, metrics


def max_diff(module_a, module_b) -> float:
    return max((a.detach().float() - b.detach().float()).abs().max().item()
               for a, b in zip(module_a.parameters(), module_b.parameters()))


def grads(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_metrics_close(ref, fast, rtol, atol):
    assert ref.keys() == fast.keys()
    for key in ref:
        torch.testing.assert_close(fast[key].float(), ref[key].float(), rtol=rtol, atol=atol, msg=key)


def test_fused_fp32_equals_reference(tiny_teacher):
    ref, ref_m = run(tiny_teacher, None, 3)
    fast, fast_m = run(tiny_teacher, StepOptions(fused=True), 3)
    for r, f in zip(ref_m, fast_m):
        assert_metrics_close(r, f, rtol=1e-6, atol=1e-6)
    for name in ("generator", "generator_ema", "fake"):
        assert max_diff(getattr(ref, name), getattr(fast, name)) <= 1e-6, name
    assert (fast.step, fast.images_seen) == (ref.step, ref.images_seen)
    # The step really trained something (otherwise equality would prove nothing).
    assert max_diff(fast.generator, make_state(tiny_teacher).generator) > 0


def test_frozen_networks_get_no_weight_gradient(tiny_teacher):
    ref, _ = run(tiny_teacher, None, 1)
    fast, _ = run(tiny_teacher, StepOptions(fused=True), 1)
    assert all(p.grad is None for p in fast.teacher.parameters())
    # The fake score's gradients are those of its own step: the generator step added nothing.
    torch.testing.assert_close(grads(fast.fake), grads(ref.fake), rtol=1e-6, atol=1e-7)


def test_shared_generator_sample_equals_reference_with_shared_noise(tiny_teacher):
    shared = StepOptions(share_noise=True)
    ref, ref_m = run(tiny_teacher, shared, 3)
    fast, fast_m = run(tiny_teacher, StepOptions(fused=True, share_noise=True), 3)
    for r, f in zip(ref_m, fast_m):
        assert_metrics_close(r, f, rtol=1e-6, atol=1e-6)
    assert max_diff(ref.generator, fast.generator) <= 1e-6
    # Sharing z is a real change of sampling: it differs from the default run.
    _, plain_m = run(tiny_teacher, None, 1)
    assert not torch.allclose(plain_m[0]["loss_gen"], ref_m[0]["loss_gen"])


def test_gradient_accumulation_matches_full_batch(tiny_teacher):
    ref, ref_m = run(tiny_teacher, None, 1, perturb_fake=True)
    acc, acc_m = run(tiny_teacher, StepOptions(fused=True, accumulation_rounds=2), 1, perturb_fake=True)
    # Same noise, split in two micro-batches: only the summation order differs (measured ~4e-6).
    assert_metrics_close(ref_m[0], acc_m[0], rtol=1e-5, atol=1e-6)
    assert rel_err(grads(acc.generator), grads(ref.generator)) < 1e-4
    assert rel_err(grads(acc.fake), grads(ref.fake)) < 1e-4


def test_accumulation_rounds_must_divide_both_batches(tiny_teacher):
    state = make_state(tiny_teacher)
    with pytest.raises(ValueError, match="accumulation_rounds=3 must divide batch_size=4"):
        train_step(state, options=StepOptions(fused=True, accumulation_rounds=3))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_bf16_within_stated_tolerance(tiny_teacher):
    """bf16 autocast of the UNets, fp32 loss math: stated tolerance (docs/fast_step.md).

    Both losses within 2% of fp32 and both gradients within 10% relative L2 error (measured on
    the tiny model: losses 0.01-0.6%, gradients 2.6% (fake) and 5.6% (generator)).
    """
    ref, ref_m = run(tiny_teacher, None, 1, perturb_fake=True)
    bf, bf_m = run(tiny_teacher, StepOptions(fused=True, precision="bf16"), 1, perturb_fake=True)
    for key in ("loss_fake", "loss_gen"):
        torch.testing.assert_close(bf_m[0][key], ref_m[0][key], rtol=2e-2, atol=0, msg=key)
    assert rel_err(grads(bf.fake), grads(ref.fake)) < 0.1
    assert rel_err(grads(bf.generator), grads(ref.generator)) < 0.1
    assert cosine(grads(bf.generator), grads(ref.generator)) > 0.99
    assert all(torch.isfinite(p).all() for p in bf.generator.parameters())
    assert all(p.dtype == torch.float32 for p in bf.generator.parameters())  # fp32 master weights


def test_channels_last_matches_reference(tiny_teacher):
    ref, ref_m = run(tiny_teacher, None, 1, perturb_fake=True)
    cl, cl_m = run(tiny_teacher, StepOptions(fused=True, channels_last=True), 1, perturb_fake=True)
    assert cl.generator.denoiser.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_metrics_close(ref_m[0], cl_m[0], rtol=1e-5, atol=1e-5)  # only conv summation order differs
    assert rel_err(grads(cl.generator), grads(ref.generator)) < 1e-4


def test_resume_from_copied_state_continues_identically(tiny_teacher):
    """All that the fast path needs lives in SFDState: a state rebuilt from it continues the run."""
    options = StepOptions(fused=True, share_noise=True)
    straight, straight_m = run(tiny_teacher, options, 3)
    first, _ = run(tiny_teacher, options, 2)
    resumed = make_state(tiny_teacher)
    for name in ("fake", "generator", "generator_ema", "opt_fake", "opt_gen"):
        getattr(resumed, name).load_state_dict(copy.deepcopy(getattr(first, name).state_dict()))
    resumed.rng.set_state(first.rng.get_state())
    resumed.step, resumed.images_seen = first.step, first.images_seen
    assert_metrics_close(straight_m[-1], train_step(resumed, options=options), rtol=1e-6, atol=1e-6)
    assert max_diff(straight.generator_ema, resumed.generator_ema) <= 1e-6


def test_metrics_are_tensors_and_runtime_is_cached(tiny_teacher):
    state = make_state(tiny_teacher)
    options = StepOptions(fused=True)
    metrics = train_step(state, options=options)
    train_step(state, options="fused")
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    assert len(state.__dict__["_fast_step_runtimes"]) == 1  # the preset equals the same options


@pytest.mark.parametrize("changes, match", [
    ({"precision": "fp16"}, "precision='fp16' is not allowed"),
    ({"cuda_graph": "yes"}, "cuda_graph='yes' is not allowed"),
    ({"accumulation_rounds": 0}, "accumulation_rounds must be an int >= 1"),
    ({"precision": "bf16"}, "need the fused path"),
])
def test_options_are_validated(changes, match):
    with pytest.raises(ValueError, match=match):
        StepOptions(**changes)


def test_presets_and_dict_round_trip():
    for options in STEP_PRESETS.values():
        assert StepOptions.from_dict(options.to_dict()) == options
    with pytest.raises(ValueError, match="unknown StepOptions preset 'warp'"):
        StepOptions.from_name("warp")
    with pytest.raises(ValueError, match=r"unknown StepOptions fields \['speed'\]"):
        StepOptions.from_dict({"speed": 1})


@pytest.mark.skipif(CUDA, reason="checks the CPU fallback")
def test_cuda_graph_on_cpu_errors_when_required_and_falls_back_when_auto(tiny_teacher, caplog):
    state = make_state(tiny_teacher)
    with pytest.raises(RuntimeError, match="cuda_graph='on' was requested but CUDA graphs need a CUDA device"):
        train_step(state, options=StepOptions(fused=True, cuda_graph="on"))
    with caplog.at_level(logging.INFO, logger="sfd_fast.core.fast_step"):
        metrics = train_step(state, options=StepOptions(fused=True, cuda_graph="auto"))
    assert any("cuda_graph: off" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(metrics["loss_gen"])


def test_xformers_requested_but_unavailable_errors(tiny_teacher):
    try:
        import xformers.ops  # noqa: F401
        if CUDA:
            pytest.skip("xformers and CUDA are available here; nothing to refuse")
    except Exception:
        pass
    with pytest.raises(RuntimeError, match="attention='xformers' was requested but xformers"):
        train_step(make_state(tiny_teacher), options=StepOptions(fused=True, attention="xformers"))


@pytest.mark.slow
def test_compiled_path_equals_reference(tiny_teacher):
    """torch.compile through dynamo + AOTAutograd (aot_eager backend: ~40 s on 2 CPU cores)."""
    _, ref_m = run(tiny_teacher, None, 2)
    _, comp_m = run(tiny_teacher, StepOptions(fused=True, compile="on", compile_backend="aot_eager"), 2)
    for r, c in zip(ref_m, comp_m):
        assert_metrics_close(r, c, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- GPU only

@needs_cuda
@pytest.mark.gpu
def test_cuda_graph_step_equals_eager_fast_step(tiny_teacher):
    """Whole-step capture replays the eager step: same RNG stream, same losses and weights."""
    eager_opts = StepOptions(fused=True, share_noise=True)
    eager, eager_m = run(tiny_teacher, eager_opts, 5, device="cuda")
    graph, graph_m = run(tiny_teacher, eager_opts.replace(cuda_graph="on", warmup_steps=2), 5, device="cuda")
    for r, g in zip(eager_m, graph_m):  # steps 3-5 are graph replays
        assert_metrics_close(r, g, rtol=1e-4, atol=1e-5)
    assert max_diff(eager.generator_ema, graph.generator_ema) <= 1e-4
    assert graph.step == 5 and graph.images_seen == eager.images_seen


@needs_cuda
@pytest.mark.gpu
def test_cuda_fast_preset_runs_and_stays_close(tiny_teacher):
    ref, ref_m = run(tiny_teacher, None, 1, device="cuda")
    fast, fast_m = run(tiny_teacher, StepOptions.from_name("fast").replace(compile="off"), 4, device="cuda")
    assert all(torch.isfinite(v.float()).all() for m in fast_m for v in m.values())
    torch.testing.assert_close(fast_m[0]["loss_fake"], ref_m[0]["loss_fake"], rtol=2e-2, atol=0)


def test_raise_policy_with_cuda_graph_is_refused_at_setup(tiny_teacher):
    """'raise' reads the finite flag on the host inside the step: impossible under capture."""
    state = make_state(tiny_teacher, CFG.replace(nonfinite_policy="raise"))
    with pytest.raises(ValueError, match="cuda_graph='on' cannot be combined with nonfinite_policy='raise'"):
        train_step(state, options=StepOptions(fused=True, cuda_graph="on"))
    assert state.step == 0  # refused before anything ran


@needs_cuda
@pytest.mark.gpu
def test_cuda_state_uses_fused_adam(tiny_teacher):
    state = make_state(tiny_teacher, device="cuda")
    assert state.opt_fake.defaults["fused"] and state.opt_gen.defaults["fused"]
