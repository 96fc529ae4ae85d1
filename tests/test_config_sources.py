"""Issue 15 (defaults): every SFDConfig field names its source, the presets hold each reference
implementation's values, new fields are validated, dropout / fake-score clipping / fixed EMA
decay do what the reference codes do, on both the reference and the fused step.

Sources: SiD EDM code = mingyuanzhou/SiD (sid_train.py, training/sid_training_loop.py,
training/sid_loss.py); SFD DDPM code = tqch/score-forgetting-distillation DDPM/
(configs/cifar10_sfd.yml, runners/diffusion.py, functions/losses.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch

from sfd_fast import SFDConfig, SFDState, train_step
from sfd_fast.core.config import SFD_PRESETS, field_docs, parse_overrides
from sfd_fast.core.ema import ema_beta
from sfd_fast.core.step_options import StepOptions
from sfd_fast.models.unet import SeededDropout, set_training_dropout
from step_asserts import assert_fused_equals_reference

SOURCES = ("SiD EDM code", "SFD DDPM code", "SFD SD1.5 run", "ours: ")
SMALL = dict(batch_size=4, forget_batch_size=2)


def test_every_field_names_its_source_in_one_line():
    docs = field_docs(SFDConfig)
    names = [f.name for f in dataclasses.fields(SFDConfig)]
    missing = [n for n in names if n not in docs]
    assert not missing, f"fields without a comment: {missing}"
    unsourced = {n: docs[n] for n in names if not docs[n].startswith(SOURCES)}
    assert not unsourced, f"comments that do not start with one of {SOURCES}: {unsourced}"
    assert all(len(docs[n]) > len("ours: ") + 10 and "\n" not in docs[n] for n in names)


# SiD EDM code, CIFAR-10: sid_train.py option defaults and run_sid.sh (--batch 256 aside, see the preset comment).
SID_EDM = dict(train_dropout=0.13, ema_halflife_kimg=500.0, ema_rampup_ratio=0.05, ema_decay=None,
               grad_clip_value=None, fake_grad_clip_value=None, sigma_init=2.5, alpha=1.2, t_max=800.0,
               sigma_min=0.002, sigma_max=80.0, rho=7.0, p_mean=-1.2, p_std=1.2, sigma_data=0.5,
               lr_gen=1e-5, lr_fake=1e-5, adam_betas=(0.0, 0.999), adam_eps=1e-8, fake_loss_scale=1.0,
               gen_loss_scale=100.0, omega_min=1e-5, schedule="sid-edm")
# SFD DDPM code, DDPM/configs/cifar10_sfd.yml (t_max 712 there is randint's exclusive bound).
SFD_DDPM = dict(batch_size=128, forget_batch_size=128, lambda_sg=0.01, lambda_g=0.01, train_dropout=0.1,
                grad_clip_value=1.0, fake_grad_clip_value=1.0, schedule="sfd-ddpm", ddpm_beta_start=1e-4,
                ddpm_beta_end=0.02, ddpm_timesteps=1000, ddpm_t_min=38, ddpm_t_max=711, ema_decay=0.9999,
                alpha=1.2, lr_gen=1e-5, lr_fake=1e-5, adam_betas=(0.0, 0.999), adam_eps=1e-8,
                fake_loss_scale=1.0, gen_loss_scale=1.0, forget_classes=(0,), override_classes=(1,))


@pytest.mark.parametrize("preset, expected", [("reference", SID_EDM), ("sfd-ddpm", SFD_DDPM)])
def test_preset_holds_the_reference_codes_values(preset, expected):
    cfg = SFDConfig.from_name(preset)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_sfd_ddpm_preset_starts_g_at_t_init_440():
    # runners/diffusion.py: init_sigma = sqrt(1 / abar[t_init] - 1) with t_init = 440.
    assert SFDConfig.from_name("sfd-ddpm").sigma_init == pytest.approx(2.50233, abs=1e-4)


# The demo preset as measured before issue 15, plus the new fields at the values that leave it as it was.
DEMO_BEFORE = {
    "forget_classes": [0], "override_classes": [1], "batch_size": 32, "forget_batch_size": 16, "sigma_init": 2.5,
    "p_mean": -1.2, "p_std": 1.2, "sigma_data": 0.5, "t_max": 800.0, "sigma_min": 0.002, "sigma_max": 80.0,
    "rho": 7.0, "alpha": 1.2, "omega_min": 1e-5, "lambda_sg": 1.0, "lambda_g": 1.0, "fake_loss_scale": 1.0,
    "gen_loss_scale": 100.0, "lr_gen": 3e-4, "lr_fake": 3e-4, "adam_betas": [0.0, 0.999], "adam_eps": 1e-8,
    "grad_clip_value": 1.0, "ema_halflife_kimg": 0.5, "ema_rampup_ratio": 0.05, "seed": 0,
    "nonfinite_policy": "skip", "max_consecutive_nonfinite": 50,
}
DEMO_NEW_FIELDS_OFF = {"schedule": "sid-edm", "fake_grad_clip_value": None, "train_dropout": None, "ema_decay": None}


def test_demo_preset_is_unchanged():
    demo = json.loads(SFDConfig.from_name("demo").to_json())
    assert {k: demo[k] for k in DEMO_BEFORE} == DEMO_BEFORE
    assert {k: demo[k] for k in DEMO_NEW_FIELDS_OFF} == DEMO_NEW_FIELDS_OFF


def test_quality_preset_is_the_demo_with_the_measured_longer_ema():
    demo, quality = (json.loads(SFDConfig.from_name(n).to_json()) for n in ("demo", "quality"))
    changed = {k: quality[k] for k in quality if quality[k] != demo[k]}
    assert changed == {"ema_halflife_kimg": 5.0, "ema_rampup_ratio": 0.2}
    long = json.loads(SFDConfig.from_name("quality-long").to_json())
    assert {k: long[k] for k in long if long[k] != quality[k]} == {"lr_gen": 1e-4, "lr_fake": 1e-4}


def test_config_json_from_before_issue_15_keeps_its_meaning():
    """An older state.json has ema_halflife_kimg (same name, same unit) and lacks the new fields,
    whose defaults are the old behaviour; so it loads as the run it was, not as today's defaults."""
    old = {**DEMO_BEFORE, "batch_size": 64, "forget_batch_size": 16, "lr_gen": 1e-5, "lr_fake": 1e-5,
           "lambda_sg": 0.01, "lambda_g": 0.01}  # the old SFDConfig() as written by to_json
    cfg = SFDConfig.from_dict(old)
    assert cfg.ema_halflife_kimg == 0.5
    assert {k: getattr(cfg, k) for k in DEMO_NEW_FIELDS_OFF} == DEMO_NEW_FIELDS_OFF
    diff = {k for k, v in cfg.to_dict().items() if v != getattr(SFDConfig(), k)}
    assert diff == {"ema_halflife_kimg"}  # a resume check against today's default names this field


BAD = [
    ('schedule="ddim"', r"schedule must be one of \('sid-edm', 'sfd-ddpm'\), got 'ddim'"),
    ("train_dropout=1", r"train_dropout must be in \[0, 1\) or None"),
    ("train_dropout=-0.1", r"train_dropout must be in \[0, 1\)"),
    ("train_dropout=NaN", "train_dropout must be a finite number or null, got nan"),
    ("fake_grad_clip_value=0", "fake_grad_clip_value must be > 0 or None, got 0.0"),
    ("fake_grad_clip_value=Infinity", "fake_grad_clip_value must be a finite number or null, got inf"),
    ("ema_decay=1", r"ema_decay must be in \[0, 1\) or None"),
    ("ema_decay=NaN", "ema_decay must be a finite number or null, got nan"),
    ("ema_halflife_kimg=0", "ema_halflife_kimg must be > 0, got 0.0"),
    ("ddpm_beta_start=0.03", "need 0 < ddpm_beta_start < ddpm_beta_end < 1"),
    ("ddpm_beta_end=Infinity", "ddpm_beta_end must be a finite number, got inf"),
    ("ddpm_timesteps=1", "ddpm_timesteps must be >= 2, got 1"),
    ("ddpm_timesteps=2.5", "ddpm_timesteps must be an integer, got 2.5"),
    ("ddpm_t_min=800", "need 0 <= ddpm_t_min <= ddpm_t_max < ddpm_timesteps"),
    ("ddpm_t_max=1000", "need 0 <= ddpm_t_min <= ddpm_t_max < ddpm_timesteps"),
    ("ddpm_t_min=-1", "need 0 <= ddpm_t_min"),
]


@pytest.mark.parametrize("item, message", BAD, ids=[b[0] for b in BAD])
def test_new_fields_are_validated(item, message):
    with pytest.raises(ValueError, match=message):
        SFDConfig(**parse_overrides([item]))


def test_every_preset_round_trips_through_json():
    for cfg in SFD_PRESETS.values():
        assert SFDConfig.from_dict(json.loads(cfg.to_json())) == cfg


# ----------------------------------------------------------------------------- EMA

def test_fixed_ema_decay_replaces_the_half_life_schedule(tiny_teacher):
    assert ema_beta(500.0, 0.05, 10, 6, decay=0.9999) == 0.9999
    assert ema_beta(500.0, 0.05, 10, 6) != 0.9999
    for options in (None, StepOptions(fused=True)):
        state = SFDState.create(SFDConfig(**SMALL, ema_decay=0.9, ema_rampup_ratio=None), copy.deepcopy(tiny_teacher))
        ema0 = [p.detach().clone() for p in state.generator_ema.parameters()]
        train_step(state, options=options)
        for e0, e1, g in zip(ema0, state.generator_ema.parameters(), state.generator.parameters()):
            torch.testing.assert_close(e1, 0.9 * e0 + 0.1 * g.detach(), rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(e0, e1) for e0, e1 in zip(ema0, state.generator_ema.parameters()))


# ----------------------------------------------------------------------------- fake-score clipping

@pytest.mark.parametrize("options", [None, StepOptions(fused=True)], ids=["reference", "fused"])
def test_fake_grad_clip_value_clips_the_fake_scores_gradients(tiny_teacher, options):
    def fake_grads(clip):
        state = SFDState.create(SFDConfig(**SMALL, fake_grad_clip_value=clip), copy.deepcopy(tiny_teacher))
        train_step(state, options=options)  # the generator step leaves the fake score's grads alone
        return torch.cat([p.grad.flatten() for p in state.fake.parameters() if p.grad is not None])

    clip = 1e-3
    free, clipped = fake_grads(None), fake_grads(clip)
    assert free.abs().max() > 10 * clip  # without the clip some gradient is larger (so the test can fail)
    assert clipped.abs().max() <= clip and (clipped.abs() == clip).any()
    small = free.abs() < clip  # entries below the clip are untouched
    torch.testing.assert_close(clipped[small], free[small], rtol=0, atol=0)


# ----------------------------------------------------------------------------- dropout

def _dropouts(module):
    return [m for m in module.modules() if isinstance(m, SeededDropout)]


def test_train_dropout_is_set_on_fake_and_generator_only(tiny_teacher):
    state = SFDState.create(SFDConfig(**SMALL, train_dropout=0.2), copy.deepcopy(tiny_teacher))
    for net in (state.fake, state.generator):
        found = _dropouts(net)
        assert found and all(m.p == 0.2 and m.generator is state.dropout_rng for m in found)
    assert not _dropouts(state.teacher) and not _dropouts(state.generator_ema)
    assert not state.teacher.training
    plain = SFDState.create(SFDConfig(**SMALL), copy.deepcopy(tiny_teacher))
    assert plain.dropout_rng is None and not _dropouts(plain.fake) and not _dropouts(plain.generator)


def test_seeded_dropout_drops_in_train_mode_only():
    g = torch.Generator().manual_seed(0)
    drop = SeededDropout(0.25, g)
    x = torch.ones(64, 8, 4, 4)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.02 and torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert not torch.equal(drop(x), y)  # fresh masks each call
    assert torch.equal(drop.eval()(x), x)
    # channels_last input: the same logical mask as a contiguous one from the same generator state
    g.manual_seed(1)
    a = drop.train()(torch.arange(256.).view(4, 8, 2, 4))
    g.manual_seed(1)
    b = drop(torch.arange(256.).view(4, 8, 2, 4).contiguous(memory_format=torch.channels_last))
    assert torch.equal(a, b)


def test_only_the_network_being_trained_drops_out(tiny_teacher):
    """As in both reference codes: G samples for the fake-score step in eval mode, the fake score
    scores for the generator step in eval mode; the teacher is always in eval."""
    state = SFDState.create(SFDConfig(**SMALL, train_dropout=0.2), copy.deepcopy(tiny_teacher))
    seen = []
    for name in ("fake", "generator", "teacher"):
        getattr(state, name).register_forward_hook(lambda m, a, o, name=name: seen.append((name, m.training)))
    train_step(state)
    assert seen == [("generator", False), ("fake", True), ("generator", True), ("teacher", False), ("fake", False)]
    assert state.fake.training and state.generator.training  # modes restored after the step


def test_dropout_run_is_repeated_by_its_seed_and_differs_from_no_dropout(tiny_teacher):
    def run(global_seed, **changes):
        state = SFDState.create(SFDConfig(**SMALL, **changes), copy.deepcopy(tiny_teacher))
        torch.manual_seed(global_seed)  # torch's global RNG must not matter: masks come from the state
        return [float(train_step(state)["loss_fake"]) for _ in range(2)]

    assert run(1, train_dropout=0.3) == run(2, train_dropout=0.3)
    assert run(1, train_dropout=0.3) != run(1)


def test_fused_equals_reference_with_dropout_and_both_clips(tiny_teacher):
    cfg = SFDConfig(**SMALL, train_dropout=0.2, fake_grad_clip_value=1.0, grad_clip_value=1.0)
    ref, fast = assert_fused_equals_reference(cfg, tiny_teacher)
    assert torch.equal(ref.dropout_rng.get_state(), fast.dropout_rng.get_state())


def test_shared_sample_is_not_reused_under_dropout(tiny_teacher, caplog):
    """G's sample for the fake step is drawn without dropout, its training forward with it, so
    the fused path evaluates G twice; it then equals the reference path with shared noise."""
    cfg = SFDConfig(**SMALL, train_dropout=0.2)
    ref = SFDState.create(cfg, copy.deepcopy(tiny_teacher))
    ref_m = train_step(ref, options=StepOptions(share_noise=True))
    fast = SFDState.create(cfg, copy.deepcopy(tiny_teacher))
    with caplog.at_level(logging.INFO, logger="sfd_fast.core.fast_step"):
        fast_m = train_step(fast, options=StepOptions(fused=True, share_noise=True))
    assert any("reuse_generator_sample: off (train_dropout" in r.getMessage() for r in caplog.records)
    for key in ref_m:
        torch.testing.assert_close(fast_m[key].float(), ref_m[key].float(), rtol=1e-6, atol=1e-6, msg=key)


def test_resume_with_dropout_continues_identically(tiny_teacher):
    cfg = SFDConfig(**SMALL, train_dropout=0.2)
    straight = SFDState.create(cfg, copy.deepcopy(tiny_teacher))
    straight_m = [train_step(straight) for _ in range(3)]
    first = SFDState.create(cfg, copy.deepcopy(tiny_teacher))
    for _ in range(2):
        train_step(first)
    resumed = SFDState.create(cfg, copy.deepcopy(tiny_teacher))
    for name in ("fake", "generator", "generator_ema", "opt_fake", "opt_gen"):
        getattr(resumed, name).load_state_dict(copy.deepcopy(getattr(first, name).state_dict()))
    resumed.rng.set_state(first.rng.get_state())
    resumed.dropout_rng.set_state(first.dropout_rng.get_state())
    resumed.step, resumed.images_seen = first.step, first.images_seen
    assert float(train_step(resumed)["loss_gen"]) == float(straight_m[-1]["loss_gen"])


def test_dropout_refuses_gradient_checkpointing(tiny_teacher):
    state = SFDState.create(SFDConfig(**SMALL, train_dropout=0.1), copy.deepcopy(tiny_teacher))
    state.fake.unet.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match="train_dropout cannot be combined with gradient checkpointing"):
        train_step(state)


def test_dropout_on_a_network_without_residual_blocks_is_an_error():
    with pytest.raises(ValueError, match="train_dropout=0.1 was requested but Linear has no diffusers ResnetBlock2D"):
        set_training_dropout(torch.nn.Linear(2, 2), 0.1, torch.Generator())


@pytest.mark.slow
def test_compiled_fused_step_with_dropout_equals_reference(tiny_teacher):
    """torch.compile (aot_eager) of the fused units with SeededDropout inside the networks (~5 min on
    2 shared CPU cores: train and eval variants of each network are traced)."""
    cfg = SFDConfig(**SMALL, train_dropout=0.2)
    ref = SFDState.create(cfg, copy.deepcopy(tiny_teacher))
    ref_m = [train_step(ref) for _ in range(2)]
    comp = SFDState.create(cfg, copy.deepcopy(tiny_teacher))
    options = StepOptions(fused=True, compile="on", compile_backend="aot_eager")
    comp_m = [train_step(comp, options=options) for _ in range(2)]
    for r, c in zip(ref_m, comp_m):
        for key in r:
            torch.testing.assert_close(c[key].float(), r[key].float(), rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs); none here")
@pytest.mark.gpu
def test_cuda_graph_replays_dropout_masks_and_the_ddpm_schedule(tiny_teacher):
    """Whole-step capture with dropout_rng registered: replays draw fresh masks and DDPM t, and
    equal the eager fused step (same generators, same order)."""
    cfg = SFDConfig.from_name("sfd-ddpm").replace(**SMALL)
    eager_opts = StepOptions(fused=True)
    runs = []
    for options in (eager_opts, eager_opts.replace(cuda_graph="on", warmup_steps=2)):
        state = SFDState.create(cfg, copy.deepcopy(tiny_teacher), device="cuda")
        runs.append((state, [train_step(state, options=options) for _ in range(5)]))
    (eager, eager_m), (graph, graph_m) = runs
    for r, g in zip(eager_m, graph_m):  # steps 3-5 are graph replays
        for key in r:
            torch.testing.assert_close(g[key].float(), r[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    assert len({float(m["loss_fake"]) for m in graph_m[2:]}) == 3  # fresh draws each replay
