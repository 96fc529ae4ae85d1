"""SFD on a tiny random PixArtAlphaPipeline (DiT with learned sigma, T5 encoder + attention mask, DDPM
epsilon schedule), built from diffusers/transformers constructors and saved locally: the denoiser
against diffusers' scheduler, the CLI, the fused path, ONNX, stock diffusers, bad input. What every
backbone's tests check alike is in tests/t2i_helpers.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")

from t2i_helpers import (TOL, assert_fused_equals_reference, assert_onnx_matches, assert_trained,  # noqa: E402
                         distill_and_sample, distill_error, stock_latent_error, stock_pipeline)

from sfd_fast.models.networks import OneStepGenerator  # noqa: E402
from sfd_fast.models.pixart import PixArtDenoiser  # noqa: E402
from sfd_fast.models.sd_pipeline import load_t2i_pipeline  # noqa: E402
from sfd_fast.models.tiny_sd import build_tiny_pixart_pipeline  # noqa: E402
from sfd_fast.train.text_to_image import one_step_call_kwargs  # noqa: E402

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart") / "teacher")


@pytest.fixture(scope="module")
def pipe(pixart_dir):
    return load_t2i_pipeline(pixart_dir)


def test_denoiser_equals_ddpm_scheduler_x0(pipe):
    """D at sigma(t) equals DDPMScheduler.step(...).pred_original_sample on the first C channels (learned sigma)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler_config, clip_sample=False)  # x0 unclipped, as D
    denoiser = pipe.make_denoiser()
    c = pipe.encode_prompts(["a cat", "brad pitt", ""])
    hidden, mask = pipe.layout.unpack(c)
    assert mask[2].sum() < mask[1].sum() and set(mask.unique().tolist()) == {0.0, 1.0}  # real padding masks
    worst = 0.0
    for t in (3, 400, 999):
        x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            out = pipe.network(x, encoder_hidden_states=hidden, encoder_attention_mask=mask,
                               timestep=torch.full((3,), t), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                               return_dict=False)[0]
            assert out.shape[1] == 8  # learned sigma: 2C channels
            expected = scheduler.step(out[:, :4], t, x).pred_original_sample
            abar = scheduler.alphas_cumprod[t]
            sigma = ((1 - abar) / abar).sqrt()
            ours = denoiser(x / abar.sqrt(), sigma.expand(3), c)
        # In eps units: D = x - sigma * eps, so one rounding of the network's input (x / sqrt(abar) *
        # sqrt(abar) moves x by an ulp, eps by ~4e-7) is sigma times larger in x0; sigma is 157 at t = 999
        # (measured: eps differs by 3.6e-7 at every t, x0 by 5.6e-5 at t = 999).
        worst = max(worst, float((ours - expected).abs().max() / (1 + sigma)))
    assert worst <= 1e-5, f"max error in eps units (|x0 error| / (1 + sigma)): {worst:.3g}"


@pytest.fixture(scope="module")
def cli_run(pixart_dir, tmp_path_factory):
    return distill_and_sample(pixart_dir, tmp_path_factory.mktemp("pixartrun"))


def test_cli_steps_finite_loss_and_generator_changes(cli_run, pixart_dir):
    out, _ = cli_run
    assert_trained(out, pixart_dir, WEIGHTS)
    index = json.loads((out / "generator" / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline" and index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]


def test_generator_folder_is_a_stock_pixart_pipeline(cli_run):  # measured ~1e-6
    from diffusers import PixArtAlphaPipeline

    out, tensors = cli_run
    kwargs = one_step_call_kwargs(out / "generator")
    err = stock_latent_error(stock_pipeline(PixArtAlphaPipeline, out / "generator"), tensors, kwargs)
    assert err <= TOL, f"stock PixArt pipeline vs sfd-fast sample: {err:.3g}"


def test_fused_path_equals_reference_on_prompts(pixart_dir):
    ref, _ = assert_fused_equals_reference(pixart_dir)
    assert isinstance(ref.teacher, PixArtDenoiser) and type(ref.generator) is OneStepGenerator


def test_onnx_export_of_the_one_step_generator(pipe, tmp_path):
    generator = OneStepGenerator(pipe.make_denoiser(), 2.5).eval()
    emb = pipe.encode_prompts(["a cat", "brad pitt"])
    # dynamo (torch.export); the TorchScript graph of PixArt keeps an If around squeeze(1) that onnxruntime refuses
    assert_onnx_matches(generator, emb, tmp_path)


def test_bad_input_transformer_without_caption_conditioning(pixart_dir, tmp_path, capsys):
    folder = shutil.copytree(pixart_dir, tmp_path / "no-caption")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "caption_channels": None}))
    code, err = distill_error(folder, tmp_path, capsys)
    assert code == 2 and "Traceback" not in err and err.count("error") == 1, err
    assert "caption_channels" in err and "supported: PixArtTransformer2DModel" in err
