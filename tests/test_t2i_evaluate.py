"""CLIP-scored text-to-image metrics: the judge equals CLIP's own scoring; the CLI writes JSON and grids."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")

from sfd_fast.t2i_evaluate import ClipJudge, override_rate  # noqa: E402
from sfd_fast.t2i_tiny import build_tiny_clip, build_tiny_pipeline  # noqa: E402


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

    from sfd_fast.cli import main

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    run = tmp_path / "run"
    assert main(["distill", "--pipeline", str(pipe), "--out", str(run), "--forget", "brad pitt", "--override",
                 "a middle aged man", "--steps", "1", "--set", "batch_size=1", "--set", "forget_batch_size=1",
                 "--no-progress"]) == 0, capsys.readouterr().err
    out = tmp_path / "eval"
    code = main(["evaluate-t2i", "--run", str(run), "--clip", str(clip_dir), "--out", str(out), "--per-prompt", "2",
                 "--teacher-steps", "2", "--max-forget", "2", "--max-remain", "3"])
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
    assert "retention" in capsys.readouterr().out

    assert main(["evaluate-t2i", "--run", str(tmp_path), "--clip", str(clip_dir), "--out", str(tmp_path / "x")]) == 2
    assert "--run must be the --out folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
