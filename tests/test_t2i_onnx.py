"""The text-to-image one-step generator G(z, text_emb) exports to ONNX and matches onnxruntime."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")
pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' extra")
ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the 'onnx' extra")

from sfd_fast.models.latent_denoiser import LatentDenoiser  # noqa: E402
from sfd_fast.models.networks import OneStepGenerator  # noqa: E402
from sfd_fast.models.sd_pipeline import load_t2i_pipeline  # noqa: E402
from sfd_fast.models.tiny_sd import build_tiny_pipeline  # noqa: E402
from sfd_fast.serve import to_onnx  # noqa: E402
from sfd_fast.train.text_to_image import save_t2i_generator  # noqa: E402


# The library's exporter (to_onnx: dynamic batch, onnxruntime check at batches 1 and 3, <path>.json),
# then an independent onnxruntime run on prompt embeddings. CFG doubles the graph; marked slow.
@pytest.mark.parametrize("guidance", [1.0, pytest.param(3.0, marks=pytest.mark.slow)], ids=["no-cfg", "cfg"])
def test_t2i_generator_onnx_matches_onnxruntime(tmp_path, guidance):
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    pipe = load_t2i_pipeline(build_tiny_pipeline(tmp_path / "pipe"))
    negative = pipe.encode_prompts(["blurry"])
    generator = OneStepGenerator(LatentDenoiser(pipe.unet, pipe.scheduler_config, guidance, negative), 2.5).eval()
    emb = pipe.encode_prompts(["a cat", "brad pitt"])
    result = to_onnx(generator, tmp_path / "g.onnx", cond=emb)
    assert result.exporter == "dynamo" and result.max_abs_error <= 1e-4
    assert result.inputs["cond"]["shape"] == ["batch", *emb.shape[1:]]
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # not an export-time input
    (out,) = session.run(None, {"z": z.numpy(), "cond": emb.numpy()})
    with torch.no_grad():
        expected = generator(z, emb)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-4, rtol=1e-4)


def test_cli_exports_a_t2i_generator_folder(tmp_path, capsys):
    from sfd_fast.cli.main import main

    pipe_dir = build_tiny_pipeline(tmp_path / "pipe")
    pipe = load_t2i_pipeline(pipe_dir)
    generator = OneStepGenerator(LatentDenoiser(pipe.unet, pipe.scheduler_config), 2.5)
    folder = save_t2i_generator(generator, pipe_dir, tmp_path / "generator")
    out = tmp_path / "g.onnx"
    assert main(["export", "--generator", str(folder), "--out", str(out), "--exporter", "torchscript"]) == 0, \
        capsys.readouterr().err
    meta = json.loads((tmp_path / "g.onnx.json").read_text())
    assert meta["inputs"]["cond"] == {"dtype": "float32", "shape": ["batch", 16, 32]}
    assert meta["max_abs_error"] <= 1e-4
