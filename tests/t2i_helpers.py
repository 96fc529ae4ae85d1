"""What the end-to-end tests of the SDXL, SD3 and PixArt backbones share (tests/test_t2i_sdxl.py,
test_t2i_sd3.py, test_t2i_pixart.py): the small config, the CLI run, and the checks every backbone
passes. Each test file keeps what is its backbone's own (its builder, adapter types, extra asserts).

Tolerances: G against the stock pipeline from the same noise, ``TOL`` = 1e-4 max abs latent
difference (measured 2e-7 to 4e-6, docs/backbones.md); ONNX against torch 1e-4; the fused step
against the reference step bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sfd_fast import train_step
from sfd_fast.cli.main import main
from sfd_fast.core.prompts import ConceptSpec
from sfd_fast.models.sd_pipeline import load_t2i_pipeline
from sfd_fast.train.text_to_image import T2I_SFD_CONFIG, build_t2i_state

SPEC = ConceptSpec.from_pairs([("brad pitt", "a middle aged man")], ["a cat", "a red car"])
SMALL = T2I_SFD_CONFIG.replace(batch_size=2, forget_batch_size=2, lr_gen=1e-4, lr_fake=1e-4)
FAST = ["--set", "lr_gen=1e-3", "--set", "lr_fake=1e-3", "--set", "ema_halflife_kimg=0.001"]
TOL = 1e-4  # stock pipeline vs G, max abs latent difference
SAMPLE_PROMPTS = ["brad pitt", "brad pitt", "a cat", "a cat"]  # what `sample --prompt x2 --num 2` generates


def distill_and_sample(pipeline_dir, root, *extra: str):
    """`sfd-fast distill --pipeline` (3 fused steps, batch 1, ``extra`` options), then `sfd-fast sample
    --save-tensors` of two prompts x 2; returns (run folder, sample tensors file)."""
    out = root / "run"
    code = main(["distill", "--pipeline", str(pipeline_dir), "--out", str(out), "--forget", "brad pitt", "--override",
                 "a middle aged man", "--literal", "--steps", "3", "--set", "batch_size=1", "--set",
                 "forget_batch_size=1", *FAST, "--log-every", "1", "--step-options", "fused", *extra, "--no-progress"])
    assert code == 0
    tensors = root / "sample.safetensors"
    assert main(["sample", "--generator", str(out / "generator"), "--prompt", "brad pitt", "--prompt", "a cat",
                 "--num", "2", "--seed", "3", "--out", str(root / "s.png"), "--save-tensors", str(tensors)]) == 0
    return out, tensors


def assert_trained(out, teacher_dir, weights: str):
    """Steps 1-3 logged with finite losses, and G's network (``weights``, a file inside the folders) moved
    away from the teacher's; returns (teacher, G) state dicts."""
    log = json.loads((out / "train_log.json").read_text())["log"]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([e["loss_gen"], e["loss_fake"]])).all() for e in log)
    teacher, g = load_file(teacher_dir / weights), load_file(out / "generator" / weights)
    moved = max(float((teacher[k] - g[k]).abs().max()) for k in teacher)
    assert moved > 1e-4, f"G did not move away from the teacher (max weight change {moved:.3g})"
    return teacher, g


def stock_pipeline(pipeline_class, folder):
    """``pipeline_class.from_pretrained(folder)`` with diffusers alone, no progress bar."""
    pipe = pipeline_class.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_latent_error(pipe, tensors, kwargs: dict) -> float:
    """Max abs difference between the stock pipeline's latents from the saved noise and `sfd-fast sample`'s."""
    saved = load_file(tensors)
    with torch.no_grad():
        latents = pipe(SAMPLE_PROMPTS, latents=saved["noise"].clone(), output_type="latent", **kwargs).images
    return float((latents.float() - saved["samples"]).abs().max())


def assert_fused_equals_reference(pipeline_dir, spec: ConceptSpec = SPEC, steps: int = 2):
    """Two states from the same folder, ``steps`` reference and fused steps: equal metrics and weights bit for
    bit; returns the (reference, fused) states."""
    def run(step_options):
        state = build_t2i_state(load_t2i_pipeline(pipeline_dir), spec, SMALL)
        return state, [train_step(state, options=step_options) for _ in range(steps)]

    (ref, m_ref), (fused, m_fused) = run(None), run("fused")
    for a, b in zip(m_ref, m_fused):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    for mod in ("fake", "generator", "generator_ema"):
        for (name, p), q in zip(getattr(ref, mod).named_parameters(), getattr(fused, mod).parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m: f"{mod}.{name}: {m}")
    return ref, fused


def assert_onnx_matches(generator, emb, tmp_path, **export_options):
    """G exported with ``to_onnx`` (``export_options``: e.g. the exporter) runs in onnxruntime on a new z
    and matches torch to 1e-4; returns the export result."""
    pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' extra")
    ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the 'onnx' extra")
    from sfd_fast.serve import to_onnx

    result = to_onnx(generator, tmp_path / "g.onnx", cond=emb, **export_options)
    assert result.max_abs_error <= 1e-4
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    (out,) = session.run(None, {"z": z.numpy(), "cond": emb.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), generator(z, emb), atol=1e-4, rtol=1e-4)
    return result


def distill_error(pipeline, tmp_path, capsys) -> tuple[int, str]:
    """(exit code, stderr) of a one-step `sfd-fast distill --pipeline` expected to refuse the folder."""
    capsys.readouterr()  # drop what building the folder printed
    code = main(["distill", "--pipeline", str(pipeline), "--out", str(tmp_path / "o"), "--forget", "brad pitt",
                 "--override", "a man", "--literal", "--steps", "1", "--no-progress"])
    return code, capsys.readouterr().err.strip()
