"""The text-to-image one-step generator G(z, text_emb) exports to ONNX and matches onnxruntime."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")
pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' extra")
ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the 'onnx' extra")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")

from sfd_fast.networks import OneStepGenerator  # noqa: E402
from sfd_fast.t2i_denoiser import LatentDenoiser  # noqa: E402
from sfd_fast.t2i_pipeline import load_t2i_pipeline  # noqa: E402
from sfd_fast.t2i_tiny import build_tiny_pipeline  # noqa: E402


# CFG doubles the exported graph's work; ~1 min to export on the 2-core CI box, so marked slow.
@pytest.mark.parametrize("guidance", [1.0, pytest.param(3.0, marks=pytest.mark.slow)], ids=["no-cfg", "cfg"])
def test_t2i_generator_onnx_matches_onnxruntime(tmp_path, guidance):
    pipe = load_t2i_pipeline(build_tiny_pipeline(tmp_path / "pipe"))
    negative = pipe.encode_prompts(["blurry"])
    generator = OneStepGenerator(LatentDenoiser(pipe.unet, pipe.scheduler_config, guidance, negative), 2.5).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = pipe.encode_prompts(["a cat", "brad pitt"])
    path = tmp_path / "g.onnx"
    torch.onnx.export(generator, (z, emb), str(path), dynamo=True, external_data=False,
                      input_names=["z", "text_emb"], output_names=["latents"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    z2 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # not the tracing input
    (out,) = session.run(None, {"z": z2.numpy(), "text_emb": emb.numpy()})
    with torch.no_grad():
        expected = generator(z2, emb)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-4, rtol=1e-4)
