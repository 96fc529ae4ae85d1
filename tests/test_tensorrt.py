"""TensorRT runner: input checks on CPU (no TensorRT needed), engine accuracy on a CUDA host.

The CPU tests exercise our validation (dtype mapping, dtype/device/stride checks, the optimisation
profile, set_input_shape's False) against small stand-ins for the engine's *metadata queries* and the
context's two setters. They do not fake TensorRT: nothing is built or executed. The engine tests need
TensorRT >= 10 and a CUDA GPU and skip with the reason otherwise; run them on a GPU host with
``pytest -rP tests/test_tensorrt.py`` to see the measured errors.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from sfd_fast import EDMDenoiser, UNetConfig, build_unet
from sfd_fast.models.networks import OneStepGenerator
from sfd_fast.serve import TensorRTRunner, TensorRTUnavailable, build_engine, tensorrt_available, to_onnx
from sfd_fast.serve.tensorrt import (TensorSpec, bind_inputs, check_input, check_shape, io_specs, set_input_shape,
                                     torch_dtype)

_TRT_OK, _TRT_WHY = tensorrt_available()
needs_trt = pytest.mark.skipif(not _TRT_OK, reason=f"TensorRT unavailable: {_TRT_WHY}")

IMAGE = (3, 8, 8)
PROFILE = ((1, *IMAGE), (4, *IMAGE), (8, *IMAGE))


class _EngineMetadata:
    """Answers the ICudaEngine metadata queries io_specs makes, from a table; runs nothing.

    Modes and dtypes are given as TensorRT's enum member names, wrapped like pybind11 enum values
    (an object with ``.name``) or as their str() ("DataType.HALF"), the two forms the code accepts.
    """

    def __init__(self, tensors: dict[str, tuple[str, object, tuple | None]]):
        self.tensors = tensors  # name -> (mode name, dtype, (min, opt, max) or None)

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str):
        return SimpleNamespace(name=self.tensors[name][0])

    def get_tensor_dtype(self, name: str):
        return self.tensors[name][1]

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        assert profile_index == 0
        return [list(dims) for dims in self.tensors[name][2]]  # TensorRT returns Dims; any sequence of ints


class _RecordingContext:
    """Stands in for IExecutionContext.set_input_shape / set_tensor_address: records the calls and
    answers set_input_shape with ``accept`` (TensorRT answers False for a shape it refuses)."""

    def __init__(self, accept: bool = True):
        self.accept, self.shapes, self.addresses = accept, {}, {}

    def set_input_shape(self, name, shape) -> bool:
        self.shapes[name] = shape
        return self.accept

    def set_tensor_address(self, name, ptr) -> None:
        self.addresses[name] = ptr


def _specs() -> dict[str, TensorSpec]:
    engine = _EngineMetadata({
        "z": ("INPUT", SimpleNamespace(name="FLOAT"), PROFILE),
        "cond": ("INPUT", "DataType.INT64", ((1,), (4,), (8,))),
        "image": ("OUTPUT", SimpleNamespace(name="FLOAT"), None)})
    return io_specs(engine)[0]


@pytest.mark.parametrize("name,expected", [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
                                           ("INT32", torch.int32), ("INT64", torch.int64), ("BOOL", torch.bool),
                                           ("INT8", torch.int8), ("UINT8", torch.uint8)])
def test_torch_dtype_maps_tensorrt_dtypes(name, expected):
    assert torch_dtype(SimpleNamespace(name=name)) is expected
    assert torch_dtype(f"DataType.{name}") is expected


def test_torch_dtype_refuses_a_dtype_torch_lacks():
    with pytest.raises(ValueError, match="INT4 has no torch equivalent"):
        torch_dtype(SimpleNamespace(name="INT4"))


def test_io_specs_reads_modes_dtypes_and_profile():
    engine = _EngineMetadata({
        "z": ("INPUT", SimpleNamespace(name="HALF"), PROFILE),
        "cond": ("INPUT", SimpleNamespace(name="INT64"), ((1,), (4,), (8,))),
        "image": ("OUTPUT", SimpleNamespace(name="BF16"), None)})
    inputs, outputs = io_specs(engine)
    assert inputs == {"z": TensorSpec("z", torch.float16, PROFILE),
                      "cond": TensorSpec("cond", torch.int64, ((1,), (4,), (8,)))}
    assert outputs == {"image": TensorSpec("image", torch.bfloat16, None)}


@pytest.mark.parametrize("name,given,wanted", [("z", torch.float16, "torch.float32"),
                                               ("z", torch.float64, "torch.float32"),
                                               ("cond", torch.int32, "torch.int64"),
                                               ("cond", torch.float32, "torch.int64")])
def test_check_input_names_the_input_and_both_dtypes(name, given, wanted):
    spec = _specs()[name]
    t = torch.zeros((2, *IMAGE) if name == "z" else (2,), dtype=given)
    with pytest.raises(ValueError, match=rf"input '{name}': dtype {given} given, the engine wants {wanted}"):
        check_input(spec, t, torch.device("cpu"))


def test_check_input_refuses_a_host_tensor_for_a_cuda_engine():
    with pytest.raises(ValueError, match=r"input 'z': on cpu, the engine runs on cuda:0"):
        check_input(_specs()["z"], torch.zeros(2, *IMAGE), torch.device("cuda", 0))


def test_check_input_refuses_non_contiguous():
    z = torch.zeros(2, 8, 8, 3).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match="input 'z': not contiguous"):
        check_input(_specs()["z"], z, torch.device("cpu"))


def test_check_input_accepts_what_the_engine_wants():
    specs = _specs()
    check_input(specs["z"], torch.zeros(2, *IMAGE), torch.device("cpu"))
    check_input(specs["cond"], torch.zeros(2, dtype=torch.int64), torch.device("cpu"))


@pytest.mark.parametrize("shape", [(9, *IMAGE), (0, *IMAGE), IMAGE, (2, 4, 8, 8), (2, 3, 16, 8)])
def test_check_shape_names_the_shape_and_the_profile(shape):
    with pytest.raises(ValueError) as info:
        check_shape(_specs()["z"], shape)
    msg = str(info.value)
    assert f"shape {shape} is outside" in msg
    assert "min (1, 3, 8, 8), opt (4, 3, 8, 8), max (8, 3, 8, 8)" in msg


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_check_shape_accepts_the_profile_bounds(batch):
    check_shape(_specs()["z"], (batch, *IMAGE))


def test_set_input_shape_raises_when_tensorrt_answers_false():
    ctx = _RecordingContext(accept=False)
    with pytest.raises(ValueError, match=r"TensorRT refused shape \(2, 3, 8, 8\) for input 'z' "
                                         r"\(profile min \(1, 3, 8, 8\), opt \(4, 3, 8, 8\), max \(8, 3, 8, 8\)\)"):
        set_input_shape(ctx, _specs()["z"], (2, *IMAGE))
    assert ctx.shapes == {"z": (2, *IMAGE)}  # within our profile check, so TensorRT was asked


def test_set_input_shape_does_not_ask_tensorrt_outside_the_profile():
    ctx = _RecordingContext()
    with pytest.raises(ValueError, match="outside the engine's optimisation profile"):
        set_input_shape(ctx, _specs()["z"], (9, *IMAGE))
    assert ctx.shapes == {}


def test_bind_inputs_checks_every_input_before_binding_any():
    specs, ctx = _specs(), _RecordingContext()
    z, bad_cond = torch.zeros(2, *IMAGE), torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="input 'cond': dtype torch.int32"):
        bind_inputs(ctx, specs, {"z": z, "cond": bad_cond}, torch.device("cpu"))
    with pytest.raises(ValueError, match="input 'cond': shape \\(9,\\) is outside"):
        bind_inputs(ctx, specs, {"z": z, "cond": torch.zeros(9, dtype=torch.int64)}, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"the engine's inputs are \['cond', 'z'\], got \['z'\]"):
        bind_inputs(ctx, specs, {"z": z}, torch.device("cpu"))
    assert ctx.shapes == {} and ctx.addresses == {}


def test_bind_inputs_sets_shapes_and_addresses():
    specs, ctx = _specs(), _RecordingContext()
    feeds = {"z": torch.zeros(3, *IMAGE), "cond": torch.zeros(3, dtype=torch.int64)}
    bind_inputs(ctx, specs, feeds, torch.device("cpu"))
    assert ctx.shapes == {"z": (3, *IMAGE), "cond": (3,)}
    assert ctx.addresses == {n: t.data_ptr() for n, t in feeds.items()}


def test_bind_inputs_raises_when_tensorrt_refuses_a_shape():
    feeds = {"z": torch.zeros(3, *IMAGE), "cond": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(ValueError, match="TensorRT refused shape"):
        bind_inputs(_RecordingContext(accept=False), _specs(), feeds, torch.device("cpu"))


@pytest.mark.skipif(_TRT_OK, reason="checks the message shown when TensorRT is missing")
def test_runner_without_tensorrt_says_why(tmp_path):
    with pytest.raises(TensorRTUnavailable, match="TensorRT|CUDA"):
        TensorRTRunner(tmp_path / "g.engine")


# --- on a CUDA host with TensorRT ---------------------------------------------------------------

def _generator() -> OneStepGenerator:
    torch.manual_seed(0)
    return OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name("tiny")))).eval()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The tiny generator and its fp16 and bf16 engines (profile batch 1..8), built once."""
    tmp = tmp_path_factory.mktemp("trt")
    g = _generator()
    to_onnx(g, tmp / "g.onnx", exporter="torchscript")
    return g, {p: build_engine(tmp / "g.onnx", tmp / f"g-{p}.engine", precision=p, batch_sizes=(1, 4, 8))
               for p in ("fp16", "bf16")}


@needs_trt
@pytest.mark.gpu
@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_low_precision_engine_within_2x_torch_autocast_error(engines, precision, dtype, record_property):
    """Max abs error vs the fp32 eager generator (on CPU, so no TF32) must be at most 2x the error of
    torch autocast computing the same generator in the same dtype on the same inputs. GroupNorm is
    the known risk: autocast keeps it in fp32, TensorRT may run it in fp16/bf16."""
    g, engine_paths = engines
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(6, *g.denoiser.image_shape, generator=gen)
    c = torch.randint(0, g.denoiser.num_classes, (6,), generator=gen)
    with torch.no_grad():
        ref = g(z, c)
        with torch.autocast("cuda", dtype=dtype):
            amp = copy.deepcopy(g).cuda()(z.cuda(), c.cuda())
    out = TensorRTRunner(engine_paths[precision])(z, c)
    torch.cuda.synchronize()
    err_amp = (amp.float().cpu() - ref).abs().max().item()
    err_trt = (out.float().cpu() - ref).abs().max().item()
    record_property("max_abs_error_tensorrt", err_trt)
    record_property("max_abs_error_torch_autocast", err_amp)
    print(f"{precision}: max abs error vs fp32 torch: TensorRT {err_trt:.3g}, torch autocast {err_amp:.3g}, "
          f"ratio {err_trt / err_amp:.2f} (bound 2)")
    assert 0 < err_amp < 1, f"autocast {precision} error {err_amp} is no usable baseline"
    assert out.is_cuda and out.dtype == torch.float32 and out.shape == ref.shape
    assert err_trt <= 2 * err_amp, (f"TensorRT {precision} max abs error {err_trt:.3g} > 2 x torch autocast "
                                    f"{err_amp:.3g}")


@needs_trt
@pytest.mark.gpu
def test_runner_refuses_wrong_dtypes_and_batches_outside_the_profile(engines):
    g, engine_paths = engines
    runner = TensorRTRunner(engine_paths["fp16"])
    assert runner.inputs["z"].dtype == torch.float32  # FP16 flag: layers in fp16, I/O stays fp32
    assert runner.inputs["cond"].dtype == torch.int64, "TensorRT 10's ONNX parser keeps int64 inputs"
    z = torch.randn(2, *g.denoiser.image_shape, device="cuda")
    c = torch.randint(0, g.denoiser.num_classes, (2,), device="cuda")
    with pytest.raises(ValueError, match="input 'cond': dtype torch.int32 given, the engine wants torch.int64"):
        runner(z, c.int())
    with pytest.raises(ValueError, match="input 'z': dtype torch.float16 given, the engine wants torch.float32"):
        runner(z.half(), c)
    with pytest.raises(ValueError, match=r"shape \(9, .*outside.*max \(8,"):
        runner(torch.randn(9, *g.denoiser.image_shape), torch.zeros(9, dtype=torch.int64))
    out = runner(z.cpu(), c.cpu())  # host tensors: copied to the engine's GPU, dtypes unchanged
    assert out.is_cuda and out.shape == z.shape and torch.isfinite(out).all()
