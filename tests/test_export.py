"""ONNX export of one-step generators, checked in onnxruntime; TensorRT where it exists."""

import json

import pytest
import torch

from sfd_fast import EDMDenoiser, OneStepGenerator, UNetConfig, build_unet
from sfd_fast.export import (EngineProfile, OnnxRuntimeRunner, build_engine, example_inputs, load_runner,
                             tensorrt_status, to_onnx)

ONNX_ATOL = 1e-4  # fp32 graph vs fp32 eager: different kernel orderings, measured ~1e-6


def _generator(preset):
    torch.manual_seed(0)
    return OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name(preset))), 2.5).eval()


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_onnx_export_matches_torch_for_several_batches_and_classes(tmp_path, preset):
    g = _generator(preset)
    meta = to_onnx(g, tmp_path / "g.onnx", parity_batches=(1, 5))
    assert meta["opset"] == 18 and max(meta["max_abs_error_vs_torch"].values()) < ONNX_ATOL
    assert json.loads((tmp_path / "g.onnx.json").read_text())["inputs"]["c_dtype"] == "int64"
    runner = OnnxRuntimeRunner(tmp_path / "g.onnx")
    z = torch.randn(10, *g.denoiser.image_shape)
    c = torch.arange(10)  # every class once
    with torch.no_grad():
        torch.testing.assert_close(runner(z, c), g(z, c), rtol=0, atol=ONNX_ATOL)


def test_onnx_export_with_embedding_condition(tmp_path):
    g = _generator("tiny")
    emb = g.denoiser.unet.class_embedding.weight[:2].detach().clone()
    meta = to_onnx(g, tmp_path / "g.onnx", cond=emb, parity_batches=(1, 3))
    assert meta["inputs"]["c_dtype"] == "float32"
    z, _ = example_inputs(g, 2)
    with torch.no_grad():
        torch.testing.assert_close(OnnxRuntimeRunner(tmp_path / "g.onnx")(z, emb), g(z, emb), rtol=0, atol=ONNX_ATOL)


def test_bad_paths_and_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="must end with .onnx"):
        to_onnx(_generator("tiny"), tmp_path / "g.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runner(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="precision 'int4' is not supported"):
        build_engine(tmp_path / "g.onnx", precision="int4")
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        EngineProfile(4, 2, 8)


def test_tensorrt_engine_matches_torch(tmp_path):
    ok, why = tensorrt_status()
    if not ok:
        pytest.skip(why)
    g = _generator("tiny").cuda()
    to_onnx(g.cpu(), tmp_path / "g.onnx")
    engine = build_engine(tmp_path / "g.onnx", precision="fp32", profiles=(EngineProfile(1, 8, 64),))
    runner = load_runner(engine)
    z, c = example_inputs(g, 8)
    with torch.no_grad():
        torch.testing.assert_close(runner(z.cuda(), c.cuda()).cpu(), g.cpu()(z, c), rtol=0, atol=1e-3)
