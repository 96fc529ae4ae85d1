"""SFD on a tiny random StableDiffusionXLPipeline (text_time UNet, two CLIP text encoders with the pooled
embedding from the second, added_cond_kwargs text_embeds + time_ids, CFG with negative prompts), built
from diffusers/transformers constructors and saved locally. What every backbone's tests check alike is
in tests/t2i_helpers.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")

from t2i_helpers import (TOL, assert_fused_equals_reference, assert_onnx_matches, assert_trained,  # noqa: E402
                         distill_and_sample, distill_error, stock_latent_error, stock_pipeline)

from sfd_fast.core.prompts import ConceptSpec  # noqa: E402
from sfd_fast.models.sd_pipeline import load_t2i_pipeline  # noqa: E402
from sfd_fast.models.sdxl import SDXLDenoiser  # noqa: E402
from sfd_fast.models.tiny_sd import build_tiny_sdxl_pipeline  # noqa: E402
from sfd_fast.train.text_to_image import one_step_call_kwargs  # noqa: E402

SPEC = ConceptSpec.from_pairs([("brad pitt", "a middle aged man")], ["a cat", "a red car"], negative_prompt="blurry")
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "teacher")


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    return load_t2i_pipeline(sdxl_dir)


def test_conditioning_matches_the_stock_pipeline(pipe):
    """Tokens from both encoders, pooled from the second, zeros for '' (force_zeros_for_empty_prompt), time ids."""
    hidden, _, pooled, _ = pipe.pipe.encode_prompt(prompt=["a cat"], device="cpu", do_classifier_free_guidance=False)
    _, negative, _, negative_pooled = pipe.pipe.encode_prompt(prompt=["a cat"], device="cpu",
                                                             do_classifier_free_guidance=True)
    c = pipe.encode_prompts(["a cat", ""])
    h, p = pipe.layout.unpack(c)
    assert hidden.shape[-1] == 64 and pooled.shape[-1] == 32  # 32 + 32 token widths; projection of encoder 2
    torch.testing.assert_close(h[0], hidden[0], rtol=0, atol=0)
    torch.testing.assert_close(p[0], pooled[0], rtol=0, atol=0)
    assert float(negative.abs().max()) == 0 and float(negative_pooled.abs().max()) == 0
    assert float(c[1].abs().max()) == 0  # '' is SDXL's zero unconditional embedding
    assert pipe.time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]


@pytest.mark.parametrize("t", [3, 400, 999])
def test_denoiser_equals_scheduler_x0(pipe, t):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler_config, clip_sample=False)
    denoiser = pipe.make_denoiser()
    c = pipe.encode_prompts(["a cat", "brad pitt"])
    h, p = pipe.layout.unpack(c)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t))
    with torch.no_grad():
        eps = pipe.unet(x, torch.full((2,), t), encoder_hidden_states=h,
                        added_cond_kwargs={"text_embeds": p, "time_ids": pipe.time_ids.expand(2, -1)}).sample
        expected = scheduler.step(eps, t, x).pred_original_sample
        abar = scheduler.alphas_cumprod[t]
        ours = denoiser(x / abar.sqrt(), ((1 - abar) / abar).sqrt().expand(2), c)
    err = float(((ours - expected).abs() / (1 + expected.abs())).max())
    assert err <= 1e-5, f"max error relative to 1 + |x0|: {err:.3g}"


def test_teacher_cfg_uses_the_negative_prompt(pipe):
    c = pipe.encode_prompts(["a cat", "a red car"])
    neg = pipe.encode_prompts(["blurry"])
    plain, guided = pipe.make_denoiser(), pipe.make_denoiser(4.5, neg)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 3.0])
    with torch.no_grad():
        d_c, d_n, d_g = plain(x, sigma, c), plain(x, sigma, neg.expand(2, -1, -1)), guided(x, sigma, c)
    torch.testing.assert_close(d_g, d_n + 4.5 * (d_c - d_n), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def cli_run(sdxl_dir, tmp_path_factory):
    """3 CLI steps with bf16 trained weights (fp32 masters), gradient checkpointing, the fused step, teacher CFG
    with a negative prompt and a generator with its own CFG 2.0; then `sfd-fast sample --save-tensors`."""
    return distill_and_sample(sdxl_dir, tmp_path_factory.mktemp("sdxlrun"), "--negative-prompt", "blurry",
                              "--generator-guidance-scale", "2.0", "--trained-precision", "bf16",
                              "--gradient-checkpointing")


def test_cli_steps_finite_loss_and_generator_changes(cli_run, sdxl_dir):
    out, _ = cli_run
    assert_trained(out, sdxl_dir, WEIGHTS)
    config = json.loads((out / "config.json").read_text())
    assert config["t2i"]["trained_precision"] == "bf16" and config["t2i"]["gradient_checkpointing"]


def test_generator_folder_is_a_stock_sdxl_pipeline_with_cfg(cli_run):  # measured ~4e-6
    from diffusers import StableDiffusionXLPipeline

    out, tensors = cli_run
    kwargs = one_step_call_kwargs(out / "generator")
    assert kwargs == {"num_inference_steps": 1, "guidance_scale": 2.0, "negative_prompt": "blurry"}
    err = stock_latent_error(stock_pipeline(StableDiffusionXLPipeline, out / "generator"), tensors, kwargs)
    assert err <= TOL, f"stock SDXL pipeline vs sfd-fast sample: {err:.3g}"


def test_fused_path_equals_reference_on_prompts(sdxl_dir):
    ref, _ = assert_fused_equals_reference(sdxl_dir, SPEC)
    assert isinstance(ref.teacher, SDXLDenoiser)


def test_onnx_export_of_the_one_step_generator(pipe, tmp_path):
    from sfd_fast.models.networks import OneStepGenerator

    generator = OneStepGenerator(pipe.make_denoiser(), 2.5).eval()
    emb = pipe.encode_prompts(["a cat", "brad pitt"])
    assert_onnx_matches(generator, emb, tmp_path, exporter="torchscript")


def test_bad_input_unet_without_text_time(sdxl_dir, pipe, tmp_path, capsys):
    from sfd_fast.models.latent_denoiser import LatentDenoiser

    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*SDXLDenoiser"):
        LatentDenoiser(pipe.unet, pipe.scheduler_config)  # the SD1.x adapter given an SDXL UNet
    folder = shutil.copytree(sdxl_dir, tmp_path / "no-text-time")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": None}))
    code, err = distill_error(folder, tmp_path, capsys)
    assert code == 2 and "Traceback" not in err and err.count("error") == 1, err
    assert "supported: UNet2DConditionModel with addition_embed_type 'text_time'" in err
