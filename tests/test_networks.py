"""Denoisers over real diffusers UNets: EDM preconditioning, the DDPM adapter, persistence, errors."""

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from sfd_fast import (
    CheckpointError,
    DDPMDenoiser,
    EDMDenoiser,
    OneStepGenerator,
    UNetConfig,
    build_unet,
    load_denoiser,
    save_denoiser,
)
from sfd_fast.models.networks import load_generator, save_generator


def _tiny_ddpm(prediction_type: str):
    torch.manual_seed(0)
    unet = build_unet(UNetConfig.from_name("tiny"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    return DDPMDenoiser(unet, dict(scheduler.config)).eval(), scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_adapter_matches_diffusers_scheduler(prediction_type):
    """D(x_t / sqrt(abar_t), sigma_t) equals DDPMScheduler.step's pred_original_sample at integer t."""
    model, scheduler = _tiny_ddpm(prediction_type)
    torch.manual_seed(1)
    x_ddpm = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([0, 3, 9])
    for t in (0, 17, 500, 999):
        abar = scheduler.alphas_cumprod[t]
        sigma = ((1 - abar) / abar).sqrt()
        with torch.no_grad():
            ours = model(x_ddpm / abar.sqrt(), sigma.expand(3), labels)
            out = model.unet(x_ddpm, torch.full((3,), t), class_labels=labels).sample
        theirs = scheduler.step(out, t, x_ddpm).pred_original_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.timestep(sigma.reshape(1)), torch.tensor([float(t)]), rtol=0, atol=1e-3)


def test_edm_preconditioning_formula(tiny_teacher):
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.tensor([0.5, 3.0])
    c = torch.tensor([1, 2])
    with torch.no_grad():
        out = tiny_teacher.unet(x / (sigma ** 2 + 0.25).sqrt().view(-1, 1, 1, 1), sigma.log() / 4,
                                class_labels=c).sample
        expected = (0.25 / (sigma ** 2 + 0.25)).view(-1, 1, 1, 1) * x + \
            (sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()).view(-1, 1, 1, 1) * out
        torch.testing.assert_close(tiny_teacher(x, sigma, c), expected)


def test_class_embeddings_can_replace_labels(tiny_teacher):
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 1.0]), torch.tensor([3, 7])
    emb = tiny_teacher.unet.class_embedding.weight[labels]
    with torch.no_grad():
        torch.testing.assert_close(tiny_teacher(x, sigma, labels), tiny_teacher(x, sigma, emb))


def test_one_step_generator_is_denoiser_at_sigma_init(tiny_teacher):
    g = OneStepGenerator(tiny_teacher, 2.5)
    z, c = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(g(z, c), tiny_teacher(2.5 * z, torch.full((2,), 2.5), c))


def test_save_load_roundtrip_edm_and_ddpm(tmp_path, tiny_teacher):
    x, s, c = torch.randn(2, 1, 8, 8), torch.tensor([0.7, 2.0]), torch.tensor([4, 5])
    for model in (tiny_teacher, _tiny_ddpm("epsilon")[0]):
        save_denoiser(model, tmp_path / model.kind)
        loaded = load_denoiser(tmp_path / model.kind)
        assert type(loaded) is type(model)
        assert not any(p.name.endswith((".bin", ".pt", ".pkl")) for p in (tmp_path / model.kind).rglob("*"))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, s, c), model(x, s, c))


def test_generator_roundtrip(tmp_path, tiny_teacher):
    g = OneStepGenerator(tiny_teacher, 2.5)
    save_generator(g, tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    z, c = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, c), g(z, c))
    with pytest.raises(CheckpointError, match="not a one-step generator"):
        save_denoiser(tiny_teacher, tmp_path / "t")
        load_generator(tmp_path / "t")


def test_save_overwrites_atomically(tmp_path, tiny_teacher):
    save_denoiser(tiny_teacher, tmp_path / "m")
    save_denoiser(tiny_teacher, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old directories left


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path, tiny_teacher):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_denoiser(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a denoiser directory"):
        load_denoiser(tmp_path / "empty")
    save_denoiser(tiny_teacher, tmp_path / "m")
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="could not load"):
        load_denoiser(tmp_path / "m")


def test_model_without_class_conditioning_is_refused(tmp_path):
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, layers_per_block=1)
    with pytest.raises(ValueError, match="no class conditioning.*num_class_embeds=None"):
        EDMDenoiser(unet)
    unet.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "sfd_fast.json").write_text(json.dumps({"kind": "edm"}))
    with pytest.raises(ValueError, match="no class conditioning"):
        load_denoiser(tmp_path / "m")


def test_unet_config_validation():
    with pytest.raises(ValueError, match="resolution 12 must be divisible by 8"):
        UNetConfig(resolution=12, block_out_channels=(8, 8, 8, 8), attention_levels=(False,) * 4)
    with pytest.raises(ValueError, match="unknown UNet preset 'huge'"):
        UNetConfig.from_name("huge")
