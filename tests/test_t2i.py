"""Text-to-image SFD on a tiny random SD-style pipeline saved locally (real diffusers/transformers)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")

from sfd_fast import train_step  # noqa: E402
from sfd_fast.core.prompts import ConceptSpec, PromptConditions, read_prompts  # noqa: E402
from sfd_fast.io.atomic import CheckpointError  # noqa: E402
from sfd_fast.models.latent_denoiser import LatentDenoiser, sigma_of_timestep  # noqa: E402
from sfd_fast.models.sd_pipeline import load_t2i_pipeline  # noqa: E402
from sfd_fast.models.tiny_sd import build_tiny_pipeline  # noqa: E402
from sfd_fast.train.text_to_image import (
    T2I_SFD_CONFIG,
    T2IOptions,
    build_t2i_state,
    load_t2i_generator,
    sample_t2i,
    save_t2i_generator,
)

SPEC = ConceptSpec.from_substitution("brad pitt", "a middle aged man", ["a cat", "a red car"],
                                     templates=("{}", "a photo of {}"))
SMALL = T2I_SFD_CONFIG.replace(batch_size=2, forget_batch_size=2)


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {p: build_tiny_pipeline(root / p, prediction_type=p) for p in ("epsilon", "v_prediction")}


@pytest.fixture
def pipe(pipeline_dirs):
    return load_t2i_pipeline(pipeline_dirs["epsilon"])


def test_load_saved_pipeline_and_cache_prompts(pipe, pipeline_dirs):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    emb = pipe.encode_prompts(["a cat", "", "a cat"])
    assert emb.shape == (3, 16, 32)
    torch.testing.assert_close(emb[0], emb[2])
    assert not torch.allclose(emb[0], emb[1])
    assert set(pipe._cache) == {"a cat", ""}  # each distinct prompt encoded once
    assert pipe.decode(torch.randn(2, 4, 8, 8)).shape == (2, 3, 16, 16)


def test_load_rejects_incomplete_folder(tmp_path, pipeline_dirs):
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_t2i_pipeline(tmp_path)
    import shutil

    broken = shutil.copytree(pipeline_dirs["epsilon"], tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="vae"):
        load_t2i_pipeline(broken)


def test_sigma_init_matches_sd_t_init(pipe):
    assert sigma_of_timestep(pipe.scheduler_config, 625) == pytest.approx(2.5, abs=0.01)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler_name", ["DDPMScheduler", "DDIMScheduler"])
def test_denoiser_matches_diffusers_scheduler_step(pipeline_dirs, prediction_type, scheduler_name):
    import diffusers

    pipe = load_t2i_pipeline(pipeline_dirs[prediction_type])
    scheduler = getattr(diffusers, scheduler_name).from_config(pipe.scheduler_config)
    if scheduler_name == "DDIMScheduler":
        scheduler.set_timesteps(1000)
    denoiser = LatentDenoiser(pipe.unet, pipe.scheduler_config)
    emb = pipe.encode_prompts(["a cat", "a red car", "a cat"])
    torch.manual_seed(0)
    for t in (3, 400, 999):
        x_ddpm = torch.randn(3, 4, 8, 8)
        timesteps = torch.full((3,), t)
        with torch.no_grad():
            model_out = pipe.unet(x_ddpm, timesteps, encoder_hidden_states=emb).sample
            expected = scheduler.step(model_out, t, x_ddpm).pred_original_sample
            abar = scheduler.alphas_cumprod[t]
            sigma = ((1 - abar) / abar).sqrt()
            ours = denoiser(x_ddpm / abar.sqrt(), sigma.expand(3), emb)
        torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)


def test_cfg_equals_hand_combination_with_negative_prompt(pipe):
    emb = pipe.encode_prompts(["a cat", "a red car"])
    neg_a, neg_b = pipe.encode_prompts(["nude"]), pipe.encode_prompts(["blurry"])
    plain = LatentDenoiser(pipe.unet, pipe.scheduler_config)
    guided = LatentDenoiser(pipe.unet, pipe.scheduler_config, 4.5, neg_a)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 3.0])
    with torch.no_grad():
        d_cond = plain(x, sigma, emb)
        d_neg = plain(x, sigma, neg_a.expand(2, -1, -1))
        out = guided(x, sigma, emb)
        other = guided.set_guidance(4.5, neg_b)(x, sigma, emb)
    torch.testing.assert_close(out, d_neg + 4.5 * (d_cond - d_neg), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, other, atol=1e-4)  # the negative prompt is really used
    with pytest.raises(ValueError, match="negative_embedding"):
        LatentDenoiser(pipe.unet, pipe.scheduler_config, 2.0)


def test_concept_specs():
    kw = ConceptSpec.from_keywords(["nude", "naked"], ["woman", "man"], ["a cat"])
    assert ("nude woman", "woman") in zip(kw.forget, kw.override) and len(kw.forget) == 4
    assert kw.negative_prompt == "nude, naked"
    assert SPEC.forget == ("brad pitt", "a photo of brad pitt")
    assert SPEC.override == ("a middle aged man", "a photo of a middle aged man")
    with pytest.raises(ValueError, match="both forgotten and remaining"):
        ConceptSpec.from_pairs([("a cat", "a dog")], ["a cat"])
    with pytest.raises(ValueError, match="placeholder"):
        ConceptSpec.from_substitution("x", "y", ["a cat"], templates=("no slot",))


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# remain\na cat\n\n a red car \n")
    assert read_prompts(f) == ("a cat", "a red car")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_prompt_dropout_only_in_fake_training(pipe):
    cond = PromptConditions.encode(SPEC, pipe, drop_prob=0.5)
    rng = torch.Generator().manual_seed(0)
    c = cond.sample_conditions(64, 64, rng, "cpu")
    dropped = (c.fake_train == cond.empty).flatten(1).all(1)
    kept = (c.fake_train == c.generator).flatten(1).all(1)
    assert 20 < int(dropped.sum()) < 108 and bool((dropped | kept).all())
    torch.testing.assert_close(c.teacher[:64], c.generator[:64])
    none = PromptConditions.encode(SPEC, pipe, drop_prob=0.0).sample_conditions(8, 8, rng, "cpu")
    torch.testing.assert_close(none.fake_train, none.generator)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("options", [T2IOptions(), T2IOptions(teacher_precision="bf16", compute_precision="bf16",
                                                              gradient_checkpointing=True),
                                     T2IOptions(teacher_precision="bf16", trained_precision="bf16")],
                         ids=["fp32", "bf16-autocast+checkpointing", "bf16-weights+masters"])
def test_sfd_steps_train_only_fake_and_generator(pipe, options):
    vae, text = _snapshot(pipe.vae), _snapshot(pipe.text_encoder)
    state = build_t2i_state(pipe, SPEC, SMALL.replace(lr_gen=1e-4, lr_fake=1e-4), options)
    teacher, fake, gen = _snapshot(state.teacher), _snapshot(state.fake), _snapshot(state.generator)
    for _ in range(2):
        metrics = train_step(state)
    assert all(bool(torch.isfinite(v)) for v in metrics.values())
    assert not _changed(teacher, state.teacher)
    assert not _changed(vae, pipe.vae) and not _changed(text, pipe.text_encoder)
    assert _changed(fake, state.fake) and _changed(gen, state.generator)
    assert state.image_shape == (4, 8, 8)


def _run(pipeline_dir, options=T2IOptions(), step_options=None, steps=2):
    state = build_t2i_state(load_t2i_pipeline(pipeline_dir), SPEC, SMALL.replace(lr_gen=1e-4, lr_fake=1e-4), options)
    metrics = [train_step(state, options=step_options) for _ in range(steps)]
    return state, metrics


def _same_run(a, b, exact=True):
    (state_a, metrics_a), (state_b, metrics_b) = a, b
    for ma, mb in zip(metrics_a, metrics_b):
        for key in ma:
            torch.testing.assert_close(ma[key], mb[key], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6,
                                       msg=lambda m: f"{key}: {m}")
    for mod in ("fake", "generator", "generator_ema"):
        for (name, p), q in zip(getattr(state_a, mod).named_parameters(), getattr(state_b, mod).parameters()):
            torch.testing.assert_close(p, q, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6,
                                       msg=lambda m: f"{mod}.{name}: {m}")


def test_fused_path_on_text_conditions_equals_reference(pipeline_dirs):
    """The fast path (input-only backward, up-front noise) is the same SFD step for prompts."""
    reference = _run(pipeline_dirs["epsilon"])
    _same_run(reference, _run(pipeline_dirs["epsilon"], step_options="fused"))
    state, metrics = _run(pipeline_dirs["epsilon"], step_options="bf16")  # autocast: runs, finite
    assert all(bool(torch.isfinite(v.float())) for m in metrics for v in m.values())


def test_gradient_checkpointing_of_all_three_unets_matches_plain_backward(pipeline_dirs):
    state, _ = _run(pipeline_dirs["epsilon"], T2IOptions(gradient_checkpointing=True), steps=0)
    assert all(net.unet.is_gradient_checkpointing for net in (state.teacher, state.fake, state.generator.denoiser))
    plain = _run(pipeline_dirs["epsilon"])
    _same_run(plain, _run(pipeline_dirs["epsilon"], T2IOptions(gradient_checkpointing=True)), exact=False)
    _same_run(plain, _run(pipeline_dirs["epsilon"], T2IOptions(gradient_checkpointing=True), "fused"), exact=False)


def test_bf16_trained_weights_keep_fp32_masters_ema_and_resume(pipeline_dirs, tmp_path):
    from sfd_fast.core.master_weights import MasterWeightAdam
    from sfd_fast.train.checkpoint import load_checkpoint, save_checkpoint

    options = T2IOptions(trained_precision="bf16")
    state, _ = _run(pipeline_dirs["epsilon"], options, steps=1)
    for net, opt in ((state.fake, state.opt_fake), (state.generator.denoiser, state.opt_gen)):
        assert isinstance(opt, MasterWeightAdam) and net.unet.dtype == torch.bfloat16
        assert net.log_sigmas.dtype == torch.float32  # the sigma -> timestep table keeps its precision
        for p, m in zip(net.unet.parameters(), opt.master_params):
            assert m.dtype == torch.float32 and torch.equal(p, m.to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in state.generator_ema.parameters())
    path = save_checkpoint(state, tmp_path)
    straight = [train_step(state) for _ in range(2)]
    resumed, _ = _run(pipeline_dirs["epsilon"], options, steps=0)
    load_checkpoint(path, resumed)
    _same_run((state, straight), (resumed, [train_step(resumed) for _ in range(2)]))
    for a, b in zip(state.opt_gen.master_params, resumed.opt_gen.master_params):
        assert torch.equal(a, b)


def test_robust_sfd_on_text_embeddings(pipe):
    from sfd_fast.baselines.robust_sfd import RobustConfig, inner_attack, robust_sfd_step

    state = build_t2i_state(pipe, SPEC, SMALL.replace(lr_gen=1e-4, lr_fake=1e-4))
    cond = state.forget.sample_conditions(0, 2, state.rng, "cpu")
    z = torch.randn(2, *state.image_shape)
    delta = inner_attack(state, cond.generator, cond.teacher, z, RobustConfig(inner_steps=2))
    assert delta.shape == cond.generator.shape and float(delta.abs().max()) > 0
    assert all(p.grad is None for p in state.generator.parameters())  # the attack leaves G untouched
    teacher, gen = _snapshot(state.teacher), _snapshot(state.generator)
    metrics = robust_sfd_step(state, RobustConfig(inner_steps=1), options="fused")
    assert all(bool(torch.isfinite(v)) for v in metrics.values()) and "loss_gen_adv" in metrics
    assert not _changed(teacher, state.teacher) and _changed(gen, state.generator)


def test_forget_prompt_routes_to_override_for_teacher_and_forget_for_fake(pipe):
    state = build_t2i_state(pipe, SPEC, SMALL, T2IOptions(prompt_drop=0.0))
    cond = state.forget
    seen = {"teacher": [], "fake": []}

    def recorder(name):
        def hook(module, args, kwargs):
            seen[name].append(kwargs["encoder_hidden_states"].detach().float())
        return hook

    handles = [state.teacher.unet.register_forward_pre_hook(recorder("teacher"), with_kwargs=True),
               state.fake.unet.register_forward_pre_hook(recorder("fake"), with_kwargs=True)]
    train_step(state)
    for h in handles:
        h.remove()

    def which(rows, table):
        """Index into ``table`` (N, L, D) of each row of ``rows`` (B, L, D); -1 if none matches."""
        match = (rows[:, None] - table[None]).abs().flatten(2).amax(-1) < 1e-5
        return torch.where(match.any(1), match.float().argmax(1), torch.full((rows.shape[0],), -1))

    # Calls: fake-score step (fake), then generator step (teacher, fake). CFG batches [negative; cond].
    assert len(seen["teacher"]) == 1 and len(seen["fake"]) == 2
    n = SMALL.batch_size
    teacher_cond = seen["teacher"][0].chunk(2)[1]
    fake_eval_cond = seen["fake"][1].chunk(2)[1]
    fake_train_cond = seen["fake"][0].chunk(2)[1]
    assert bool((which(teacher_cond[n:], cond.override) >= 0).all())
    assert bool((which(teacher_cond[n:], cond.forget) < 0).all())
    for rows in (fake_eval_cond, fake_train_cond):
        assert bool((which(rows[n:], cond.forget) >= 0).all())
    assert bool((which(teacher_cond[:n], cond.remain) >= 0).all())
    # Same forget sample -> its own override: the pairing is kept row by row.
    torch.testing.assert_close(which(teacher_cond[n:], cond.override), which(fake_eval_cond[n:], cond.forget))
    # The unconditional branch sees the negative prompt's embedding.
    torch.testing.assert_close(seen["teacher"][0].chunk(2)[0], cond.negative.expand(n + SMALL.forget_batch_size, -1, -1))


def test_save_load_and_sample_generator(pipe, pipeline_dirs, tmp_path):
    state = build_t2i_state(pipe, SPEC, SMALL)
    train_step(state)
    out = save_t2i_generator(state.generator, pipeline_dirs["epsilon"], tmp_path / "gen")
    generator, loaded_pipe = load_t2i_generator(out)
    emb = pipe.encode_prompts(["a cat", "brad pitt"])
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(generator(z, emb), state.generator(z, emb), atol=1e-5, rtol=1e-5)
    images = sample_t2i(generator, loaded_pipe, ["a cat", "brad pitt"], seed=1)
    assert images.shape == (2, 3, 16, 16) and bool(images.abs().le(1).all())
    with pytest.raises(CheckpointError, match="not a text-to-image one-step generator"):
        load_t2i_generator(pipeline_dirs["epsilon"])


def test_cli_distill_pipeline_then_sample(pipeline_dirs, tmp_path, capsys):
    from PIL import Image

    from sfd_fast.cli.main import main

    out = tmp_path / "run"
    code = main(["distill", "--pipeline", str(pipeline_dirs["epsilon"]), "--out", str(out), "--forget", "brad pitt",
                 "--override", "a middle aged man", "--steps", "1", "--set", "batch_size=1",
                 "--set", "forget_batch_size=1", "--no-progress", "--step-options", "fused",
                 "--trained-precision", "bf16", "--gradient-checkpointing", "--robust", "--robust-inner-steps", "1"])
    assert code == 0, capsys.readouterr().err
    written = json.loads((out / "config.json").read_text())
    assert written["step_options"] == "fused" and written["t2i"]["trained_precision"] == "bf16"
    assert written["robust"] == {"inner_steps": 1}
    assert "loss_gen_adv" in json.loads((out / "train_log.json").read_text())["log"][-1]
    png = tmp_path / "s.png"
    assert main(["sample", "--generator", str(out / "generator"), "--prompt", "brad pitt", "--prompt", "a cat",
                 "--num", "2", "--out", str(png)]) == 0
    side = 2 * (2 * (16 + 1) + 1)  # 2x2 grid of 16x16 images, 1-pixel gaps, upscaled x2
    assert Image.open(png).size == (side, side)
    assert "NFE 1" in capsys.readouterr().out


def test_cli_checkpoint_and_resume_equal_a_straight_run(pipeline_dirs, tmp_path, capsys):
    from safetensors.torch import load_file

    from sfd_fast.cli.main import main

    common = ["distill", "--pipeline", str(pipeline_dirs["epsilon"]), "--forget", "brad pitt", "--override",
              "a middle aged man", "--set", "batch_size=1", "--set", "forget_batch_size=1", "--set", "lr_gen=1e-3",
              "--set", "lr_fake=1e-3", "--set", "ema_halflife_kimg=0.001", "--trained-precision", "bf16",
              "--log-every", "1", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "straight"), "--steps", "3"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--steps", "2", "--checkpoint-every", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["step-00000001",
                                                                                      "step-00000002"]
    assert main(common + ["--out", str(tmp_path / "split"), "--steps", "3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    weights = "generator/unet/diffusion_pytorch_model.safetensors"
    straight, split = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "split" / weights)
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    log = json.loads((tmp_path / "split" / "train_log.json").read_text())["log"]
    assert [entry["step"] for entry in log] == [3]


def test_cli_unpaired_forget_is_a_clear_error(pipeline_dirs, tmp_path, capsys):
    from sfd_fast.cli.main import main

    code = main(["distill", "--pipeline", str(pipeline_dirs["epsilon"]), "--out", str(tmp_path / "o"),
                 "--forget", "brad pitt", "--steps", "1", "--no-progress"])
    assert code == 2
    assert "must be given in pairs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_t2i_cli_help_documents_every_option(capsys):
    from sfd_fast.cli.main import main
    from sfd_fast.cli.text_to_image import build_distill_parser

    with pytest.raises(SystemExit) as exc:
        main(["distill", "--pipeline", "x", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in build_distill_parser()._actions:
        assert action.help and all(flag in text for flag in action.option_strings)
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--prompt" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value,message", [("--log-every", "0", "--log-every must be >= 1"),
                                                ("--keep-last", "0", "--keep-last must be >= 1"),
                                                ("--checkpoint-dir", "/dev/null/ckpt", "a file is in the way"),
                                                ("--robust-inner-steps", "0", "inner_steps >= 1")])
def test_cli_bad_numbers_are_clear_errors_before_any_model_loads(tmp_path, capsys, flag, value, message):
    from sfd_fast.cli.main import main

    extra = ["--robust"] if flag == "--robust-inner-steps" else []
    code = main(["distill", "--pipeline", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--forget",
                 "brad pitt", "--override", "a man", "--steps", "1", flag, value, *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
