"""Generator folders are diffusers pipelines: stock diffusers (or ``OneStepPipeline``) reproduces G.

Text-to-image: a tiny random SD pipeline is distilled through the CLI; the output folder is loaded by
stock ``StableDiffusionPipeline`` in a subprocess where importing sfd_fast is blocked, and its one-step
latents equal ``sfd-fast sample``'s and the library's G. Class labels: a tiny EDM teacher and DDPM
teachers are distilled through the CLI; ``sfd_fast.OneStepPipeline.from_pretrained`` (and the model
card's diffusers-only snippet) equal the library's G. Older folders still load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")

from safetensors.torch import load_file  # noqa: E402

import sfd_fast  # noqa: E402
from sfd_fast.cli.main import main  # noqa: E402
from sfd_fast.io.atomic import CheckpointError  # noqa: E402
from sfd_fast.models.networks import (OneStepGenerator, load_denoiser, load_generator, save_denoiser,  # noqa: E402
                                      save_generator)
from sfd_fast.models.tiny_sd import build_tiny_pipeline  # noqa: E402
from sfd_fast.train.text_to_image import load_t2i_generator, one_step_call_kwargs  # noqa: E402

TOL = 1e-4  # max abs difference in latents / images the issue asks for; measured ~1e-5 and below
PROMPTS = ("brad pitt", "a cat")
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Fast-moving settings so that two steps really change G away from the teacher.
FAST = ["--set", "lr_gen=1e-3", "--set", "lr_fake=1e-3", "--set", "ema_halflife_kimg=0.001"]


def _card_snippets(folder: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)


def _no_pickles(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(PICKLES)]


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    """`sfd-fast distill --pipeline` (2 steps) on a tiny SD pipeline, then `sfd-fast sample --save-tensors`."""
    root = tmp_path_factory.mktemp("t2i")
    teacher = build_tiny_pipeline(root / "teacher")
    out = root / "run"
    code = main(["distill", "--pipeline", str(teacher), "--out", str(out), "--forget", "brad pitt", "--override",
                 "a middle aged man", "--literal", "--steps", "2", "--set", "batch_size=1", "--set",
                 "forget_batch_size=1", *FAST, "--log-every", "1", "--no-progress"])
    assert code == 0
    tensors = root / "sample.safetensors"
    assert main(["sample", "--generator", str(out / "generator"), *sum((["--prompt", p] for p in PROMPTS), []),
                 "--num", "2", "--seed", "3", "--out", str(root / "s.png"), "--save-tensors", str(tensors)]) == 0
    return {"teacher": teacher, "generator": out / "generator", "tensors": tensors,
            "prompts": [p for p in PROMPTS for _ in range(2)]}


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """`sfd-fast distill --teacher` (2 steps) on a tiny EDM teacher, then `sfd-fast sample --class`."""
    from sfd_fast import EDMDenoiser, UNetConfig, build_unet

    root = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)
    save_denoiser(EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))), root / "teacher")
    out = root / "run"
    assert main(["distill", "--teacher", str(root / "teacher"), "--out", str(out), "--steps", "2", "--set",
                 "batch_size=4", "--set", "forget_batch_size=2", *FAST, "--no-progress"]) == 0
    tensors = root / "sample.safetensors"
    assert main(["sample", "--generator", str(out / "generator"), "--class", "0", "--class", "3", "--n", "2",
                 "--seed", "5", "--out", str(root / "grid.png"), "--save-tensors", str(tensors)]) == 0
    return {"teacher": root / "teacher", "generator": out / "generator", "tensors": tensors, "grid": root / "grid.png",
            "labels": [0, 0, 3, 3]}


STOCK_SCRIPT = r'''
import importlib.abc, json, sys
args = json.loads(sys.argv[1])
attempts = []

class BlockSfdFast(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "sfd_fast" or name.startswith("sfd_fast."):
            attempts.append(name)
            raise ImportError(f"sfd_fast is blocked in this process: {name}")
        return None

sys.meta_path.insert(0, BlockSfdFast())
import torch
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionPipeline

results, info = {}, {}
for code in args["class_snippets"]:                      # the class card's diffusers-only example
    ns = {}
    exec(code, ns)
    results["class_snippet_images"] = ns["images"].float().contiguous()
for code in args["t2i_snippets"]:                        # the text-to-image card's example
    ns = {}
    exec(code, ns)
    info["t2i_snippet_image_size"] = list(ns["image"].size)
pipe = ns["pipe"]                                        # StableDiffusionPipeline.from_pretrained(folder)
assert type(pipe) is StableDiffusionPipeline
pipe.set_progress_bar_config(disable=True)
noise = load_file(args["t2i_tensors"])["noise"]
with torch.no_grad():
    results["t2i_latents"] = pipe(args["prompts"], latents=noise.clone(), output_type="latent",
                                  **args["call_kwargs"]).images.float().contiguous()
info["scheduler"] = type(pipe.scheduler).__name__
info["sigmas"] = pipe.scheduler.sigmas.tolist()
info["attempts"] = attempts
info["sfd_modules"] = sorted(m for m in sys.modules if m.startswith("sfd_fast"))
save_file(results, args["out"])
print("RESULT " + json.dumps(info))
'''


@pytest.fixture(scope="module")
def stock(t2i_run, class_run, tmp_path_factory):
    """One subprocess with sfd_fast blocked: stock diffusers loads and samples both folders."""
    root = tmp_path_factory.mktemp("stock")
    gen_t2i, gen_cls = t2i_run["generator"], class_run["generator"]
    args = {"t2i": str(gen_t2i), "t2i_tensors": str(t2i_run["tensors"]), "prompts": t2i_run["prompts"],
            "call_kwargs": one_step_call_kwargs(gen_t2i), "out": str(root / "out.safetensors"),
            "t2i_snippets": [s.replace("path/to/generator", str(gen_t2i)) for s in _card_snippets(gen_t2i)],
            "class_snippets": [s.replace("path/to/generator", str(gen_cls)) for s in _card_snippets(gen_cls)
                               if "sfd_fast" not in s]}
    proc = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, json.dumps(args)], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return info, load_file(root / "out.safetensors")


# --------------------------------------------------------------------------- text-to-image


def test_t2i_folder_is_a_stock_pipeline_with_a_one_step_scheduler(t2i_run):
    from diffusers import EulerDiscreteScheduler

    gen = t2i_run["generator"]
    index = json.loads((gen / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (gen / part).is_dir(), part
    _no_pickles(gen)
    scheduler = EulerDiscreteScheduler.from_pretrained(gen / "scheduler")
    assert scheduler.config.use_karras_sigmas and scheduler.config.sigma_max == 2.5
    scheduler.set_timesteps(1)
    assert scheduler.sigmas.tolist() == [2.5, 0.0] and float(scheduler.init_noise_sigma) == 2.5
    generator, _ = load_t2i_generator(gen)
    t_init = generator.denoiser.timestep(torch.tensor([2.5]))
    assert abs(float(scheduler.timesteps[0]) - float(t_init)) < 1e-3  # ~624.81, not a whole timestep
    assert one_step_call_kwargs(gen) == {"num_inference_steps": 1, "guidance_scale": 1.0}
    # G really moved away from the teacher, so the comparisons below test G's weights.
    teacher_w = load_file(t2i_run["teacher"] / "unet" / "diffusion_pytorch_model.safetensors")
    g_w = load_file(gen / "unet" / "diffusion_pytorch_model.safetensors")
    assert max(float((teacher_w[k] - g_w[k]).abs().max()) for k in g_w) > 1e-4


def test_t2i_model_card_records_the_run(t2i_run):
    card = (t2i_run["generator"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n")
    for text in ("num_inference_steps=1", "guidance_scale=1.0", "| brad pitt | a middle aged man |",
                 str(t2i_run["teacher"].resolve()), '"guidance_scale": 4.5', '"loss_gen"', "sigma_init"):
        assert text in card, text


def test_stock_diffusers_without_sfd_fast_reproduces_the_cli_and_library_generator(t2i_run, stock):
    info, results = stock
    assert info["attempts"] == [] and info["sfd_modules"] == []  # nothing of ours was imported
    assert info["scheduler"] == "EulerDiscreteScheduler" and info["sigmas"] == [2.5, 0.0]
    assert info["t2i_snippet_image_size"] == [16, 16]  # the card's example runs as written
    saved = load_file(t2i_run["tensors"])
    stock_latents, cli_latents = results["t2i_latents"], saved["samples"]
    assert stock_latents.shape == cli_latents.shape == (4, 4, 8, 8)
    assert float((stock_latents - cli_latents).abs().max()) <= TOL
    generator, pipeline = load_t2i_generator(t2i_run["generator"])  # the library's G, same prompts and noise
    with torch.no_grad():
        library = generator(saved["noise"], pipeline.encode_prompts(t2i_run["prompts"]))
    assert float((stock_latents - library).abs().max()) <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stock_pipeline_matches_generator_with_its_own_cfg(tmp_path, prediction_type):
    """G distilled with a generator CFG (2.0, negative prompt) is reproduced by the call the folder documents;
    the pipeline's default guidance (7.5) is not G."""
    from diffusers import StableDiffusionPipeline

    from sfd_fast import train_step
    from sfd_fast.core.prompts import ConceptSpec
    from sfd_fast.models.sd_pipeline import load_t2i_pipeline
    from sfd_fast.train.text_to_image import T2I_SFD_CONFIG, T2IOptions, build_t2i_state, save_t2i_generator

    teacher = build_tiny_pipeline(tmp_path / "teacher", prediction_type=prediction_type)
    spec = ConceptSpec(("brad pitt",), ("a man",), ("a cat",), negative_prompt="blurry")
    config = T2I_SFD_CONFIG.replace(batch_size=1, forget_batch_size=1, lr_gen=1e-3, lr_fake=1e-3)
    state = build_t2i_state(load_t2i_pipeline(teacher), spec, config, T2IOptions(generator_guidance_scale=2.0))
    train_step(state)
    out = save_t2i_generator(state.generator, teacher, tmp_path / "gen", spec.negative_prompt)
    kwargs = one_step_call_kwargs(out)
    assert kwargs == {"num_inference_steps": 1, "guidance_scale": 2.0, "negative_prompt": "blurry"}
    assert "negative_prompt='blurry'" in (out / "README.md").read_text()
    kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(PROMPTS)  # diffusers: same type as prompt
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    generator, loaded = load_t2i_generator(out)
    with torch.no_grad():
        ours = generator(z, loaded.encode_prompts(list(PROMPTS)))
        stock = pipe(list(PROMPTS), latents=z.clone(), output_type="latent", **kwargs).images
        default_cfg = pipe(list(PROMPTS), latents=z.clone(), output_type="latent",
                           **{**kwargs, "guidance_scale": 7.5}).images
        torch.testing.assert_close(ours, state.generator(z, loaded.encode_prompts(list(PROMPTS))))
    assert float((stock - ours).abs().max()) <= TOL
    assert float((default_cfg - ours).abs().max()) > 1e-2


# --------------------------------------------------------------------------- class labels


def test_class_folder_is_a_one_step_pipeline(class_run):
    gen = class_run["generator"]
    index = json.loads((gen / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "EDMEulerScheduler"]
    _no_pickles(gen)
    meta = json.loads((gen / "sfd_fast.json").read_text())
    assert meta["role"] == "one_step_generator" and meta["sigma_init"] == 2.5 and meta["kind"] == "edm"
    card = (gen / "README.md").read_text()
    assert "library_name: diffusers" in card and "OneStepPipeline.from_pretrained" in card
    assert "## What it forgets" in card and "teacher" in card and "lambda_g" in card  # the run's record


def test_one_step_pipeline_reproduces_cli_sample_and_library_generator(class_run, tmp_path):
    from PIL import Image

    pipe = sfd_fast.OneStepPipeline.from_pretrained(class_run["generator"])
    pipe.set_progress_bar_config(disable=True)
    saved = load_file(class_run["tensors"])
    labels = class_run["labels"]
    latents = pipe(labels, latents=saved["noise"], output_type="latent").images
    assert float((latents - saved["samples"]).abs().max()) <= TOL
    generator = load_generator(class_run["generator"])
    with torch.no_grad():
        library = generator(saved["noise"], torch.tensor(labels))
    assert float((latents - library).abs().max()) <= TOL
    # generator= draws the same noise as `sfd-fast sample --seed` (torch.randn order, like DDPMPipeline).
    drawn = pipe(labels, generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert float((drawn - saved["samples"]).abs().max()) <= TOL
    pil = pipe(labels, generator=torch.Generator().manual_seed(5)).images
    assert len(pil) == 4 and all(isinstance(im, Image.Image) and im.size == (8, 8) and im.mode == "L" for im in pil)
    arr = pipe(labels, generator=torch.Generator().manual_seed(5), output_type="np").images
    pt = pipe(labels, generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert arr.shape == (4, 8, 8, 1) and pt.shape == (4, 1, 8, 8)
    torch.testing.assert_close(pt, (library / 2 + 0.5).clamp(0, 1), atol=TOL, rtol=0)
    assert Image.open(class_run["grid"]).size == (2 * (2 * 9 + 1), 2 * (2 * 9 + 1))  # 2x2 grid, x2 upscale
    # save_pretrained / from_pretrained round trip of the pipeline itself.
    pipe.save_pretrained(tmp_path / "again")
    _no_pickles(tmp_path / "again")
    again = sfd_fast.OneStepPipeline.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(again(labels, latents=saved["noise"], output_type="latent").images, latents)


def test_class_card_snippet_runs_with_stock_diffusers_only(class_run, stock):
    _, results = stock
    generator = load_generator(class_run["generator"])
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        library = generator(z, torch.tensor([0, 1, 2]))
    assert float((results["class_snippet_images"] - library).abs().max()) <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_class_teacher_through_cli_gives_an_euler_one_step_pipeline(tmp_path, prediction_type):
    from diffusers import DDPMPipeline, DDPMScheduler

    from sfd_fast import UNetConfig, build_unet

    torch.manual_seed(0)
    DDPMPipeline(unet=build_unet(UNetConfig.from_name("tiny")),
                 scheduler=DDPMScheduler(prediction_type=prediction_type, clip_sample=False)).save_pretrained(
        tmp_path / "teacher")
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--set", "batch_size=2", "--set", "forget_batch_size=2", *FAST, "--no-progress"]) == 0
    gen = tmp_path / "run" / "generator"
    assert json.loads((gen / "model_index.json").read_text())["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    pipe = sfd_fast.OneStepPipeline.from_pretrained(gen)
    assert pipe.scheduler.config.prediction_type == prediction_type
    generator = load_generator(gen)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = [0, 2, 5, 9]
    with torch.no_grad():
        library = generator(z, torch.tensor(labels))
    assert float((pipe(labels, latents=z, output_type="latent").images - library).abs().max()) <= TOL


def test_generator_pretrained_methods_and_pipeline_errors(tmp_path, tiny_teacher):
    assert "OneStepPipeline" in sfd_fast.__all__ and sfd_fast.OneStepPipeline.__name__ == "OneStepPipeline"
    g = OneStepGenerator(tiny_teacher, 2.5)
    g.save_pretrained(tmp_path / "g")
    loaded = OneStepGenerator.from_pretrained(tmp_path / "g")
    z, c = torch.randn(2, 1, 8, 8), torch.tensor([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, c), g(z, c))
        torch.testing.assert_close(g.to_pipeline()(c, latents=z, output_type="latent").images, g(z, c),
                                   atol=TOL, rtol=0)
    pipe = g.to_pipeline()
    with pytest.raises(ValueError, match="out of range"):
        pipe([3, 10])
    with pytest.raises(ValueError, match="output_type"):
        pipe([3], output_type="jpeg")
    with pytest.raises(ValueError, match="shape"):
        pipe([3, 4], latents=torch.randn(3, 1, 8, 8))
    with pytest.raises(ValueError, match="class_labels"):
        pipe([0.5])


# --------------------------------------------------------------------------- older folders


def test_old_class_generator_folders_still_load(tmp_path, tiny_teacher):
    from diffusers import DDPMScheduler

    from sfd_fast import DDPMDenoiser, UNetConfig, build_unet

    torch.manual_seed(0)
    ddpm = DDPMDenoiser(build_unet(UNetConfig.from_name("tiny")), dict(DDPMScheduler(clip_sample=False).config))
    z, c = torch.randn(2, 1, 8, 8), torch.tensor([0, 7])
    for denoiser in (tiny_teacher, ddpm.eval()):
        g = OneStepGenerator(denoiser, 2.5)
        old = tmp_path / denoiser.kind
        save_denoiser(denoiser, old, {"role": "one_step_generator", "sigma_init": 2.5})  # the layout before
        assert not (old / "model_index.json").exists()
        with torch.no_grad():
            torch.testing.assert_close(load_generator(old)(z, c), g(z, c), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="not a one-step generator"):
        save_denoiser(tiny_teacher, tmp_path / "teacher")
        load_generator(tmp_path / "teacher")


def test_embedded_teacher_loads_and_its_generator_is_a_pipeline(tmp_path):
    from sfd_fast import EDMDenoiser
    from sfd_fast.cli.demo import TEACHER_DIR

    teacher = load_denoiser(TEACHER_DIR)
    assert isinstance(teacher, EDMDenoiser)
    save_generator(OneStepGenerator(teacher, 2.5), tmp_path / "g")
    pipe = sfd_fast.OneStepPipeline.from_pretrained(tmp_path / "g")
    z = torch.randn(2, *teacher.image_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = OneStepGenerator(teacher, 2.5)(z, torch.tensor([0, 1]))
    assert float((pipe([0, 1], latents=z, output_type="latent").images - ours).abs().max()) <= TOL


def test_old_t2i_folder_still_loads_and_new_folders_are_not_class_generators(t2i_run, tmp_path):
    new = t2i_run["generator"]
    old = shutil.copytree(new, tmp_path / "old")  # the previous layout: the teacher's own scheduler, no card
    shutil.rmtree(old / "scheduler")
    shutil.copytree(t2i_run["teacher"] / "scheduler", old / "scheduler")
    shutil.copy2(t2i_run["teacher"] / "model_index.json", old / "model_index.json")
    (old / "README.md").unlink()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    (g_new, p_new), (g_old, _) = load_t2i_generator(new), load_t2i_generator(old)
    emb = p_new.encode_prompts(list(PROMPTS))
    with torch.no_grad():
        torch.testing.assert_close(g_old(z, emb), g_new(z, emb), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="StableDiffusionPipeline"):
        load_generator(new)


def test_sample_cli_errors_name_the_right_flag(t2i_run, class_run, tmp_path, capsys):
    png = str(tmp_path / "x.png")
    cases = [(["--generator", str(class_run["generator"]), "--prompt", "a cat"], "give --class, not --prompt"),
             (["--generator", str(t2i_run["generator"]), "--class", "1"], "give --prompt, not --class"),
             (["--generator", str(class_run["generator"]), "--class", "10"], "out of range"),
             (["--generator", str(class_run["generator"])], "give at least one --class"),
             (["--generator", str(tmp_path / "missing"), "--class", "1"], "does not exist")]
    for args, message in cases:
        assert main(["sample", *args, "--out", png]) == 2
        assert message in capsys.readouterr().err, message
