"""ONNX export parity in onnxruntime; TensorRT paths skip with the reason where unavailable."""

from __future__ import annotations

import json

import pytest
import torch

from sfd_fast import EDMDenoiser, UNetConfig, build_unet
from sfd_fast.models.networks import OneStepGenerator
from sfd_fast.serve import OnnxRuntimeRunner, build_engine, load_runner, tensorrt_available, to_onnx

TOL = 1e-4  # float32 CPU: observed ~5e-7


def _generator(preset: str) -> OneStepGenerator:
    torch.manual_seed(0)
    return OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name(preset)))).eval()


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_onnx_parity_several_batches_and_classes(tmp_path, preset):
    g = _generator(preset)
    result = to_onnx(g, tmp_path / "g.onnx", exporter="torchscript", tolerance=TOL)
    assert result.max_abs_error <= TOL
    meta = json.loads((tmp_path / "g.onnx.json").read_text())
    assert meta["inputs"]["cond"]["dtype"] == "int64" and meta["opset"] == result.opset
    runner = OnnxRuntimeRunner(tmp_path / "g.onnx")
    for b in (1, 4, 7):
        z = torch.randn(b, *g.denoiser.image_shape)
        c = torch.randint(0, 10, (b,))
        with torch.no_grad():
            ref = g(z, c)
        assert (runner(z, c) - ref).abs().max() <= TOL
    # The class input is really used: another class gives another image.
    z = torch.randn(1, *g.denoiser.image_shape)
    assert (runner(z, torch.tensor([0])) - runner(z, torch.tensor([9]))).abs().max() > 1e-3


@pytest.mark.slow
def test_dynamo_exporter(tmp_path):  # ~90 s on the shared 2-core CPU
    result = to_onnx(_generator("tiny"), tmp_path / "g.onnx", exporter="dynamo")
    assert result.exporter == "dynamo" and result.max_abs_error <= TOL


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="exporter"):
        to_onnx(_generator("tiny"), tmp_path / "g.onnx", exporter="jit")
    with pytest.raises(ValueError, match="dtype"):
        to_onnx(_generator("tiny"), tmp_path / "g.onnx", cond=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(FileNotFoundError, match="sfd-fast export"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match=".onnx or .engine"):
        load_runner(tmp_path / "g.pt")


_TRT_OK, _TRT_WHY = tensorrt_available()


@pytest.mark.skipif(_TRT_OK, reason="checks the message shown when TensorRT is missing")
def test_build_engine_without_tensorrt_says_why(tmp_path):
    to_onnx(_generator("tiny"), tmp_path / "g.onnx", exporter="torchscript")
    with pytest.raises(RuntimeError, match="TensorRT|CUDA"):
        build_engine(tmp_path / "g.onnx", precision="fp32")


@pytest.mark.skipif(not _TRT_OK, reason=f"TensorRT unavailable: {_TRT_WHY}")
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_tensorrt_engine_matches_pytorch(tmp_path, precision, tol):
    g = _generator("tiny")
    to_onnx(g, tmp_path / "g.onnx", exporter="torchscript")
    runner = load_runner(build_engine(tmp_path / "g.onnx", precision=precision, batch_sizes=(1, 4, 8)))
    z, c = torch.randn(5, *g.denoiser.image_shape), torch.randint(0, 10, (5,))
    out = runner(z.cuda(), c.cuda())
    assert out.is_cuda and (out.cpu() - g(z, c).detach()).abs().max() <= tol


def test_export_leaves_the_callers_generator_untouched(tmp_path):
    g = _generator("tiny").to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    to_onnx(g, tmp_path / "g.onnx", exporter="torchscript", tolerance=1e-2)
    assert g.training and all(p.dtype == torch.bfloat16 for p in g.parameters())
    assert all(torch.equal(v, before[k]) for k, v in g.state_dict().items())
