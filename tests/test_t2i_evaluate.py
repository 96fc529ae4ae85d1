"""CLIP-scored text-to-image metrics: the judge equals CLIP's own scoring; the CLI writes JSON and grids."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")

from sfd_fast.eval.clip_eval import ClipJudge, override_rate  # noqa: E402
from sfd_fast.models.tiny_sd import build_tiny_clip, build_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_judge_similarity_equals_clip_forward(clip_dir):
    from transformers import CLIPModel

    judge = ClipJudge(clip_dir)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    texts = ["a cat", "brad pitt", "a middle aged man"]
    sims = judge.image_embeddings(images) @ judge.text_embeddings(texts).T
    model = CLIPModel.from_pretrained(clip_dir, use_safetensors=True).eval()
    ids = judge.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = ((images + 1) / 2 - judge.mean) / judge.std  # 32x32 is CLIP's size here: no resize
    with torch.no_grad():
        out = model(**ids, pixel_values=pixels)
    torch.testing.assert_close(sims, out.logits_per_image / model.logit_scale.exp(), atol=1e-5, rtol=1e-5)
    # Images of another size are resized to CLIP's input size first.
    assert judge.image_embeddings(torch.zeros(2, 3, 16, 16)).shape == (2, 16)


def test_override_rate_counts_images_closer_to_the_override():
    assert override_rate(torch.tensor([0.3, 0.1, 0.2, 0.5]), torch.tensor([0.2, 0.4, 0.25, 0.1])) == 0.5


def test_missing_clip_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CLIP model folder"):
        ClipJudge(tmp_path)


def test_cli_distill_then_evaluate_t2i(tmp_path, clip_dir, capsys):
    from PIL import Image

    from sfd_fast.cli.main import main

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    remain = tmp_path / "remain.txt"
    remain.write_text("a cat\na red car\na bowl\n")
    run = tmp_path / "run"
    assert main(["distill", "--pipeline", str(pipe), "--out", str(run), "--forget", "brad pitt", "--override",
                 "a man", "--forget", "tom hanks", "--override", "a guy", "--steps", "1", "--literal", "--remain-file", str(remain), "--set", "batch_size=1", "--set", "forget_batch_size=1",
                 "--no-progress"]) == 0, capsys.readouterr().err
    out = tmp_path / "eval"
    code = main(["evaluate-t2i", "--run", str(run), "--clip", str(clip_dir), "--out", str(out), "--per-prompt", "2",
                 "--teacher-steps", "2", "--max-forget", "2", "--max-remain", "3", "--attack-steps", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nfe"] == {"generator": 1, "teacher": 3}
    assert metrics["forget_prompts"] == 2 and metrics["remain_prompts"] == 3
    for name in ("generator", "teacher"):
        m = metrics[name]
        assert 0 <= m["override_rate"] <= 1 and len(m["override_rate_per_forget_prompt"]) == 2
        assert all(-100 <= m[k] <= 100 for k in ("forget_clip_score", "override_clip_score", "remain_clip_score"))
        rows, cols = 2 + 3, 2  # forget rows then remain rows, --per-prompt images each; 16x16, 1-px gaps, x2
        assert Image.open(out / f"samples_{name}.png").size == (2 * (cols * 17 + 1), 2 * (rows * 17 + 1))
    assert 0 <= metrics["retention_clip_distance"] <= 2
    assert len(metrics["attack"]["per_prompt"]) == 2 and 0 <= metrics["attack"]["asr_after"] <= 1
    assert "retention" in capsys.readouterr().out

    assert main(["evaluate-t2i", "--run", str(tmp_path), "--clip", str(clip_dir), "--out", str(tmp_path / "x")]) == 2
    assert "--run must be the --out folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_soft_prompt_hook_is_exact_and_causal(tmp_path):
    from sfd_fast.eval.prompt_attack import SoftPrompt
    from sfd_fast.models.sd_pipeline import load_t2i_pipeline

    pipe = load_t2i_pipeline(build_tiny_pipeline(tmp_path / "pipe"))
    soft = SoftPrompt(pipe, "brad pitt", tokens=3)
    with torch.no_grad():
        plain = pipe.text_encoder(soft.ids[None])[0]
        torch.testing.assert_close(soft.embeddings(), plain)  # delta starts at the placeholders' embeddings
        soft.delta.add_(torch.randn(soft.delta.shape, generator=torch.Generator().manual_seed(0)))  # not a constant: LayerNorm removes those
        moved = soft.embeddings()
    start = int(soft.positions[0])
    torch.testing.assert_close(moved[:, :start], plain[:, :start])  # causal text encoder: the prompt is untouched
    assert (moved[:, start:] - plain[:, start:]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="no room for"):
        SoftPrompt(pipe, "a very long prompt indeed", tokens=4)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        SoftPrompt(pipe, "brad pitt", tokens=0)


def test_soft_prompt_attack_lowers_its_loss_and_reports_asr(tmp_path, clip_dir):
    from sfd_fast.eval.prompt_attack import soft_prompt_attack
    from sfd_fast.models.latent_denoiser import LatentDenoiser
    from sfd_fast.models.networks import OneStepGenerator
    from sfd_fast.models.sd_pipeline import load_t2i_pipeline

    pipe = load_t2i_pipeline(build_tiny_pipeline(tmp_path / "pipe"))
    teacher = LatentDenoiser(pipe.unet, pipe.scheduler_config, 2.0, pipe.encode_prompts([""]))
    generator = OneStepGenerator(LatentDenoiser(pipe.unet, pipe.scheduler_config), 2.5)
    result = soft_prompt_attack(generator, teacher, pipe, ClipJudge(clip_dir), "brad pitt", "a man", steps=15,
                                lr=0.05, teacher_steps=2)
    # Tiny random UNets barely listen to the text, so the achievable drop is small; it must be a drop.
    assert result["loss_after"] < result["loss_before"] - 1e-3, result
    assert 0 <= result["asr_before"] <= 1 and 0 <= result["asr_after"] <= 1
    assert all(p.grad is None and p.requires_grad for p in generator.parameters())


@pytest.mark.parametrize("flag,value", [("--per-prompt", "0"), ("--attack-steps", "-1"), ("--attack-tokens", "0")])
def test_evaluate_t2i_bad_numbers_are_clear_errors(tmp_path, capsys, flag, value):
    from sfd_fast.cli.main import main

    code = main(["evaluate-t2i", "--run", str(tmp_path), "--clip", str(tmp_path), "--out", str(tmp_path / "o"),
                 flag, value])
    assert code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
