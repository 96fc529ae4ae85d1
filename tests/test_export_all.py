"""Every generator kind exports to ONNX (issue 16 item 1): EDM, DDPM (epsilon, v, sample), text-to-image.

The sigma -> timestep lookup shared by the DDPM-style adapters is a compare-and-count that gives the
numbers searchsorted gave; each export is checked in onnxruntime against PyTorch on fresh inputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' extra")
ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the 'onnx' extra")

from sfd_fast import DDPMDenoiser, EDMDenoiser, OneStepGenerator, UNetConfig, build_unet  # noqa: E402
from sfd_fast.cli.main import main  # noqa: E402
from sfd_fast.models.ddpm_schedule import log_sigma_table, timestep_of_sigma  # noqa: E402
from sfd_fast.serve import to_onnx  # noqa: E402

TOL = 1e-4  # float32 CPU; observed 1e-6 .. 6e-6


def _searchsorted_timestep(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The lookup DDPMDenoiser used before (not exportable: aten::searchsorted has no ONNX symbolic)."""
    log_sigma = sigma.to(table.dtype).log().clamp(table[0], table[-1])
    hi = torch.searchsorted(table, log_sigma).clamp(1, table.numel() - 1)
    lo_val, hi_val = table[hi - 1], table[hi]
    return (hi - 1).float() + (log_sigma - lo_val) / (hi_val - lo_val)


@pytest.mark.parametrize("schedule", [dict(), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                                      dict(beta_schedule="squaredcos_cap_v2"), dict(num_train_timesteps=50)],
                         ids=["linear", "sd-scaled-linear", "cosine", "T50"])
def test_shared_lookup_equals_searchsorted(schedule):
    table = log_sigma_table(DDPMScheduler(**schedule).alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    lo, hi = float(table[0]), float(table[-1])
    sigmas = torch.cat([
        torch.exp(torch.empty(4096).uniform_(lo - 1, hi + 1, generator=gen)),  # inside and past both ends
        table.exp(),                                                           # exactly on the entries
        table[[0, -1]].exp() * torch.tensor([1 - 1e-6, 1 + 1e-6]),             # just past the ends
        torch.tensor([1e-8, 1e8]),                                             # far past the ends
    ])
    ours, before = timestep_of_sigma(sigmas, table), _searchsorted_timestep(sigmas, table)
    assert torch.equal(ours, before)
    assert ours.dtype == torch.float32 and ours.min() == 0 and ours.max() == table.numel() - 1


def test_both_adapters_use_the_shared_lookup():
    from diffusers import UNet2DConditionModel

    from sfd_fast.models.latent_denoiser import LatentDenoiser

    config = dict(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config)
    ddpm = DDPMDenoiser(build_unet(UNetConfig.from_name("tiny")), config)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    latent = LatentDenoiser(unet, config)
    sigma = torch.exp(torch.linspace(-6, 6, 257))
    expected = _searchsorted_timestep(sigma, log_sigma_table(DDPMScheduler.from_config(config).alphas_cumprod))
    assert torch.equal(ddpm.timestep(sigma), expected) and torch.equal(latent.timestep(sigma), expected)


def _ddpm_generator(prediction_type: str) -> OneStepGenerator:
    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    return OneStepGenerator(DDPMDenoiser(build_unet(UNetConfig.from_name("tiny")), dict(scheduler.config)), 2.5).eval()


def _edm_generator() -> OneStepGenerator:
    torch.manual_seed(0)
    return OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name("tiny")))).eval()


def _ort_vs_torch(generator, path, batch=5) -> float:
    """Max |onnxruntime - torch| on inputs the exporter never saw."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(123)
    z = torch.randn(batch, *generator.denoiser.image_shape, generator=gen)
    c = torch.randint(0, generator.denoiser.num_classes, (batch,), generator=gen)
    (out,) = session.run(None, {"z": z.numpy(), "cond": c.numpy()})
    with torch.no_grad():
        ref = generator(z, c)
    return float((torch.from_numpy(out) - ref).abs().max())


@pytest.mark.parametrize("kind", ["edm", "ddpm-epsilon", "ddpm-v_prediction", "ddpm-sample"])
def test_every_class_generator_exports_and_matches_onnxruntime(tmp_path, kind):
    g = _edm_generator() if kind == "edm" else _ddpm_generator(kind.split("-", 1)[1])
    result = to_onnx(g, tmp_path / "g.onnx", exporter="torchscript", tolerance=TOL)
    err = _ort_vs_torch(g, tmp_path / "g.onnx")
    print(f"{kind}: to_onnx max abs error {result.max_abs_error:.2e}, fresh batch of 5 {err:.2e}")
    assert result.max_abs_error <= TOL and err <= TOL
    assert json.loads((tmp_path / "g.onnx.json").read_text())["num_classes"] == 10


@pytest.mark.slow
def test_ddpm_generator_exports_with_dynamo(tmp_path):  # ~90 s on the shared 2-core CPU
    g = _ddpm_generator("epsilon")
    with _no_fallback():
        result = to_onnx(g, tmp_path / "g.onnx", exporter="dynamo", tolerance=TOL)
    assert result.exporter == "dynamo" and result.max_abs_error <= TOL
    assert _ort_vs_torch(g, tmp_path / "g.onnx") <= TOL


class _no_fallback:
    """Fails if to_onnx warned that dynamo failed and it fell back to TorchScript."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        fallbacks = [w for w in self.caught if "falling back" in str(w.message)]
        assert not fallbacks, fallbacks[0].message
        return False


def _diffusers_ddpm_folder(path, prediction_type="epsilon"):
    """A DDPM pipeline folder as diffusers writes it: class-conditional UNet2DModel + DDPMScheduler."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=16, num_class_embeds=10)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


def test_cli_distill_from_a_diffusers_ddpm_folder_then_export(tmp_path, capsys):
    """The issue's case: `sfd-fast export` on a generator distilled from a DDPM teacher died on aten::searchsorted."""
    from sfd_fast.models.networks import load_generator

    teacher = _diffusers_ddpm_folder(tmp_path / "ddpm")
    assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--set", "batch_size=2", "--set", "forget_batch_size=1", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["export", "--generator", str(tmp_path / "run" / "generator"), "--out", str(tmp_path / "g.onnx"),
                 "--exporter", "torchscript"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "max abs error" in captured.out
    g = load_generator(tmp_path / "run" / "generator")
    assert isinstance(g.denoiser, DDPMDenoiser)
    err = _ort_vs_torch(g, tmp_path / "g.onnx")
    print(f"distilled DDPM generator via the CLI: fresh batch of 5 {err:.2e}")
    assert err <= TOL


def test_t2i_export_writes_generator_text_encoder_and_vae_decoder(tmp_path):
    pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra")
    from sfd_fast.models.latent_denoiser import LatentDenoiser
    from sfd_fast.models.sd_pipeline import load_t2i_pipeline
    from sfd_fast.models.tiny_sd import build_tiny_pipeline
    from sfd_fast.serve.onnx import t2i_part_paths, t2i_to_onnx

    pipe = load_t2i_pipeline(build_tiny_pipeline(tmp_path / "pipe"))
    negative = pipe.encode_prompts(["blurry"])
    g = OneStepGenerator(LatentDenoiser(pipe.unet, pipe.scheduler_config, 2.0, negative), 2.5).eval()
    results = t2i_to_onnx(g, pipe, tmp_path / "out" / "g.onnx", exporter="torchscript", tolerance=TOL)
    for part, r in results.items():
        print(f"t2i {part}: max abs error {r.max_abs_error:.2e}")
        assert r.max_abs_error <= TOL
    paths = t2i_part_paths(tmp_path / "out" / "g.onnx")
    assert all(p.exists() for p in paths.values())
    meta = json.loads((tmp_path / "out" / "g.onnx.json").read_text())["text_to_image"]
    assert meta["latent_shape"] == [4, 8, 8] and meta["image_shape"] == [3, 16, 16] and meta["max_length"] == 16
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no staging left

    # Prompt -> ids -> text encoder -> G -> VAE decoder, all in onnxruntime, equals the torch pipeline.
    ids = pipe.tokenizer(["a photo of a cat", "brad pitt"], padding="max_length", max_length=16, truncation=True,
                         return_tensors="np").input_ids.astype("int64")
    sess = {k: ort.InferenceSession(str(paths[k] if k != "generator" else tmp_path / "out" / "g.onnx"),
                                    providers=["CPUExecutionProvider"]) for k in ("text_encoder", "generator", "vae_decoder")}
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    (emb,) = sess["text_encoder"].run(None, {"input_ids": ids})
    (lat,) = sess["generator"].run(None, {"z": z.numpy(), "cond": emb})
    (img,) = sess["vae_decoder"].run(None, {"latents": lat})
    with torch.no_grad():
        ref = pipe.decode(g(z, pipe.encode_prompts(["a photo of a cat", "brad pitt"])))
    err = float((torch.from_numpy(img) - ref).abs().max())
    print(f"t2i prompt -> image chain in onnxruntime vs torch: {err:.2e}")
    assert err <= TOL


def test_failed_export_writes_nothing(tmp_path, monkeypatch):
    """An export that does not match PyTorch (here: onnxruntime made to answer NaN) raises and leaves no file."""
    import sfd_fast.serve.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "verify_onnx", lambda *a: float("nan"))
    with pytest.raises(RuntimeError, match="nothing was written"):
        to_onnx(_edm_generator(), tmp_path / "g.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []
