"""SFD on a tiny random StableDiffusion3Pipeline (joint-attention transformer, two CLIP + one T5 text
encoder, pooled projections, flow-matching scheduler with shift 3), built from diffusers/transformers
constructors and saved locally: the CLI, the fused path, ONNX, stock diffusers, bad input. What every
backbone's tests check alike is in tests/t2i_helpers.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")

from safetensors.torch import load_file  # noqa: E402
from t2i_helpers import (FAST, SMALL, SPEC, TOL, assert_fused_equals_reference, assert_onnx_matches,  # noqa: E402
                         assert_trained, distill_and_sample, distill_error, stock_latent_error, stock_pipeline)

from sfd_fast import train_step  # noqa: E402
from sfd_fast.cli.main import main  # noqa: E402
from sfd_fast.models.flow_denoiser import FlowDenoiser, FlowOneStepGenerator  # noqa: E402
from sfd_fast.models.sd_pipeline import load_t2i_pipeline  # noqa: E402
from sfd_fast.models.tiny_sd import build_tiny_pipeline, build_tiny_sd3_pipeline  # noqa: E402
from sfd_fast.train.text_to_image import build_t2i_state, one_step_call_kwargs  # noqa: E402

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "teacher")


@pytest.fixture(scope="module")
def cli_run(sd3_dir, tmp_path_factory):
    """`sfd-fast distill --pipeline` (3 steps, fused) on the SD3 folder, then `sfd-fast sample --save-tensors`."""
    return distill_and_sample(sd3_dir, tmp_path_factory.mktemp("sd3run"))


def test_cli_steps_finite_loss_and_generator_changes(cli_run, sd3_dir):
    out, _ = cli_run
    teacher, g = assert_trained(out, sd3_dir, WEIGHTS)
    assert teacher.keys() == g.keys()
    index = json.loads((out / "generator" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and "unet" not in index
    assert {v[0] for k, v in index.items() if isinstance(v, list) and v[0]} <= {"diffusers", "transformers"}
    assert not (out / "generator" / "unet").exists()


def test_generator_folder_is_a_stock_sd3_pipeline(cli_run):
    """StableDiffusion3Pipeline.from_pretrained(generator) with one_step_call_kwargs reproduces `sfd-fast sample`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    out, tensors = cli_run
    kwargs = one_step_call_kwargs(out / "generator")
    assert kwargs["num_inference_steps"] == 1 and kwargs["sigmas"] == [pytest.approx(2.5 / 3.5)]
    pipe = stock_pipeline(StableDiffusion3Pipeline, out / "generator")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 1.0
    err = stock_latent_error(pipe, tensors, kwargs)  # measured ~2e-7
    with torch.no_grad():
        image = pipe("a cat", **kwargs).images[0]
    assert err <= TOL, f"stock SD3 pipeline vs sfd-fast sample: {err:.3g}"
    assert image.size == (16, 16)
    assert "StableDiffusion3Pipeline.from_pretrained" in (out / "generator" / "README.md").read_text()


def test_fused_path_equals_reference_on_prompts(sd3_dir):
    ref, fused = assert_fused_equals_reference(sd3_dir)
    assert isinstance(ref.teacher, FlowDenoiser) and isinstance(ref.generator, FlowOneStepGenerator)
    assert isinstance(ref.generator_ema, FlowOneStepGenerator)
    assert type(next(iter(fused.teacher.network.attn_processors.values()))).__name__ == "JointAttnProcessor2_0"


def test_onnx_export_of_the_one_step_generator(sd3_dir, tmp_path):
    pipe = load_t2i_pipeline(sd3_dir)
    generator = FlowOneStepGenerator(pipe.make_denoiser(), 2.5).eval()
    emb = pipe.encode_prompts(["a cat", "brad pitt"])
    result = assert_onnx_matches(generator, emb, tmp_path, exporter="torchscript")
    assert result.inputs["cond"]["shape"] == ["batch", *emb.shape[1:]]


def _distill_error(pipeline, tmp_path, capsys) -> str:
    """The one error line of a refused folder: exit 2, no traceback, no output folder."""
    code, err = distill_error(pipeline, tmp_path, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [err.splitlines()[-1]], err
    err = err.splitlines()[-1]
    assert err.startswith("sfd-fast distill: error: "), err
    assert not (tmp_path / "o").exists()
    return err


def test_bad_input_unsupported_pipeline_class(sd3_dir, tmp_path, capsys):
    folder = shutil.copytree(sd3_dir, tmp_path / "kandinsky")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    err = _distill_error(folder, tmp_path, capsys)
    from sfd_fast.models.sd_pipeline import SUPPORTED_PIPELINES

    assert "KandinskyV22Pipeline" in err and f"supported pipeline classes: {', '.join(SUPPORTED_PIPELINES)}" in err
    assert set(SUPPORTED_PIPELINES) == {"StableDiffusionPipeline", "StableDiffusionXLPipeline",
                                        "StableDiffusion3Pipeline", "PixArtAlphaPipeline"}


def test_bad_input_transformer_without_pooled_conditioning(sd3_dir, tmp_path, capsys):
    folder = shutil.copytree(sd3_dir, tmp_path / "no-pooled")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "pooled_projection_dim": None}))
    err = _distill_error(folder, tmp_path, capsys)
    assert "pooled_projection_dim" in err and "supported: SD3Transformer2DModel" in err


def test_bad_input_flow_scheduler_in_a_ddpm_unet_pipeline(tmp_path, capsys):
    folder = build_tiny_pipeline(tmp_path / "sd-flow")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    err = _distill_error(folder, tmp_path, capsys)
    assert "FlowMatchEulerDiscreteScheduler" in err and "FlowDenoiser" in err and "LatentDenoiser" in err


@pytest.mark.slow  # three CLI runs (~30 s on 2 cores)
def test_cli_checkpoint_resume_equals_a_straight_run(sd3_dir, tmp_path):
    """bf16 weights + fp32 masters, the FlowOneStepGenerator: resume from step 2 to 3 equals 3 straight steps."""
    common = ["distill", "--pipeline", str(sd3_dir), "--forget", "brad pitt", "--override", "a man", "--literal",
              "--set", "batch_size=1", "--set", "forget_batch_size=1", *FAST, "--trained-precision", "bf16",
              "--log-every", "1", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "straight"), "--steps", "3"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--steps", "2", "--checkpoint-every", "1"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--steps", "3", "--resume"]) == 0
    straight = load_file(tmp_path / "straight" / "generator" / WEIGHTS)
    split = load_file(tmp_path / "split" / "generator" / WEIGHTS)
    assert all(torch.equal(straight[k], split[k]) for k in straight)


def test_memory_options_run_on_the_flow_transformer(sd3_dir):
    """bf16 teacher, bf16 weights with fp32 masters, gradient checkpointing of all three transformers: finite, G moves."""
    from sfd_fast.core.master_weights import MasterWeightAdam
    from sfd_fast.train.text_to_image import T2IOptions

    options = T2IOptions(teacher_precision="bf16", trained_precision="bf16", gradient_checkpointing=True)
    state = build_t2i_state(load_t2i_pipeline(sd3_dir), SPEC, SMALL, options)
    assert state.teacher.network.dtype == torch.bfloat16 and isinstance(state.opt_gen, MasterWeightAdam)
    assert all(net.network.is_gradient_checkpointing for net in (state.teacher, state.fake, state.generator.denoiser))
    before = [p.detach().clone() for p in state.generator.parameters()]
    metrics = [train_step(state, options="fused") for _ in range(2)]
    assert all(bool(torch.isfinite(v.float())) for m in metrics for v in m.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, state.generator.parameters()))
