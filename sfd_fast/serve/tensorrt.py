"""ONNX -> TensorRT engine (tensorrt >= 10 Python API) and a runner over torch CUDA tensors.

TensorRT needs a CUDA host: ``pip install tensorrt`` (NVIDIA wheels, CUDA 12). Without it every
entry point raises TensorRTUnavailable naming the missing piece; use OnnxRuntimeRunner instead.

The checks the runner makes before handing raw pointers to TensorRT (dtypes, device, strides, the
optimisation profile) are plain functions over the engine's metadata (``io_specs``, ``check_input``,
``check_shape``, ``set_input_shape``, ``bind_inputs``), so they are tested without TensorRT.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from packaging.version import Version

PRECISIONS = ("fp32", "fp16", "bf16")


class TensorRTUnavailable(RuntimeError):
    pass


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed: on a CUDA host run `pip install tensorrt` (>= 10); "
            "or serve the .onnx with the onnxruntime runner (sfd_fast.serve.OnnxRuntimeRunner)") from exc
    if Version(trt.__version__).major < 10:
        raise TensorRTUnavailable(f"TensorRT >= 10 is required, found {trt.__version__}")
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and none is visible to torch; use the onnxruntime runner")
    return trt


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") or (False, reason)."""
    try:
        _import_tensorrt()
    except TensorRTUnavailable as exc:
        return False, str(exc)
    return True, ""


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike | None = None, *,
                 precision: str = "fp16", batch_sizes: tuple[int, int, int] = (1, 16, 64),
                 workspace_gb: float = 4.0, timing_cache: str | os.PathLike | None = None) -> Path:
    """Build and save a serialized engine; batch_sizes = (min, opt, max) of the optimisation profile.

    Writes ``<engine>.json`` (shapes, precision, profile, versions). fp16/bf16 allow lower-precision
    kernels (TensorRT still picks fp32 where faster or required).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    lo, opt, hi = batch_sizes
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch_sizes must be (min, opt, max) with 1 <= min <= opt <= max, got {batch_sizes}")
    onnx_path = Path(onnx_path)
    meta = json.loads(Path(f"{onnx_path}.json").read_text())
    trt = _import_tensorrt()
    engine_path = Path(engine_path or onnx_path.with_suffix(".engine"))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, spec in meta["inputs"].items():
        rest = tuple(spec["shape"][1:])
        profile.set_shape(name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    if cache_file:
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    Path(f"{engine_path}.json").write_text(json.dumps({
        **{k: meta[k] for k in ("inputs", "output", "num_classes", "sigma_init") if k in meta},
        "precision": precision, "profile": {"min": lo, "opt": opt, "max": hi}, "onnx": str(onnx_path),
        "versions": {"tensorrt": trt.__version__, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name()}}, indent=2))
    return engine_path


# trt.DataType member name -> torch dtype. By name so that this table (and the checks below) need no
# TensorRT import; INT4/FP4 have no torch dtype and are refused by torch_dtype.
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                 "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
                 "FP8": torch.float8_e4m3fn}


def _enum_name(value) -> str:
    """The member name of a TensorRT enum value (pybind11 enums have .name), or of its str()."""
    name = value if isinstance(value, str) else getattr(value, "name", str(value))
    return name.rsplit(".", 1)[-1]


def torch_dtype(trt_dtype) -> torch.dtype:
    """The torch dtype of a ``trt.DataType`` (or its member name, e.g. ``"HALF"``)."""
    name = _enum_name(trt_dtype)
    if name not in _TORCH_DTYPES:
        raise ValueError(f"TensorRT dtype {name} has no torch equivalent (known: {sorted(_TORCH_DTYPES)})")
    return _TORCH_DTYPES[name]


@dataclass(frozen=True)
class TensorSpec:
    """What the engine wants for one I/O tensor."""

    name: str
    dtype: torch.dtype  # from engine.get_tensor_dtype(name)
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None  # (min, opt, max); None for outputs


def io_specs(engine, profile_index: int = 0) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """(inputs, outputs) of an ICudaEngine (or any object with its metadata queries), by tensor name.

    Uses engine.num_io_tensors, get_tensor_name(i), get_tensor_mode(name) (TensorIOMode INPUT/OUTPUT),
    get_tensor_dtype(name) and, for inputs, get_tensor_profile_shape(name, profile_index) -> [min, opt, max].
    """
    inputs, outputs = {}, {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = _enum_name(engine.get_tensor_mode(name))
        dtype = torch_dtype(engine.get_tensor_dtype(name))
        if mode == "INPUT":
            lo, opt, hi = (tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(name, profile_index))
            inputs[name] = TensorSpec(name, dtype, (lo, opt, hi))
        elif mode == "OUTPUT":
            outputs[name] = TensorSpec(name, dtype, None)
    return inputs, outputs


def check_input(spec: TensorSpec, tensor: torch.Tensor, device: torch.device) -> None:
    """Raise ValueError unless ``tensor`` is what TensorRT will read at its data_ptr(): the engine's
    dtype, on the engine's device, contiguous. TensorRT takes a raw pointer, so a wrong dtype is read
    as garbage (int64 labels read as int32 give label 0 every other row) and a host pointer faults."""
    if tensor.dtype != spec.dtype:
        raise ValueError(f"input {spec.name!r}: dtype {tensor.dtype} given, the engine wants {spec.dtype}")
    if tensor.device != device:
        raise ValueError(f"input {spec.name!r}: on {tensor.device}, the engine runs on {device} (CUDA tensors only)")
    if not tensor.is_contiguous():
        raise ValueError(f"input {spec.name!r}: not contiguous (strides {tuple(tensor.stride())}); "
                         "TensorRT reads a dense row-major buffer, pass tensor.contiguous()")


def _profile_text(spec: TensorSpec) -> str:
    lo, opt, hi = spec.profile
    return f"min {lo}, opt {opt}, max {hi}"


def check_shape(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless every dim of ``shape`` lies within the profile's min..max."""
    lo, _, hi = spec.profile
    shape = tuple(int(d) for d in shape)
    if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
        raise ValueError(f"input {spec.name!r}: shape {shape} is outside the engine's optimisation profile "
                         f"({_profile_text(spec)}); rebuild the engine with other batch_sizes or split the batch")


def set_input_shape(context, spec: TensorSpec, shape: tuple[int, ...]) -> None:
    """context.set_input_shape, with its False return (shape refused by TensorRT) turned into an error."""
    check_shape(spec, shape)
    if not context.set_input_shape(spec.name, tuple(int(d) for d in shape)):
        raise ValueError(f"TensorRT refused shape {tuple(shape)} for input {spec.name!r} "
                         f"(profile {_profile_text(spec)}); see the TensorRT log above")


def bind_inputs(context, specs: dict[str, TensorSpec], feeds: dict[str, torch.Tensor], device: torch.device) -> None:
    """Check every input, then set its shape and address on the context. Nothing is bound when any
    check fails, so a refused call leaves no half-set context behind the error."""
    if set(feeds) != set(specs):
        raise ValueError(f"the engine's inputs are {sorted(specs)}, got {sorted(feeds)}")
    for name, t in feeds.items():
        check_input(specs[name], t, device)
        check_shape(specs[name], tuple(t.shape))
    for name, t in feeds.items():
        set_input_shape(context, specs[name], tuple(t.shape))
        context.set_tensor_address(name, t.data_ptr())


class TensorRTRunner:
    """Runs a saved engine on the current CUDA stream; takes and returns torch CUDA tensors.

    ``run(feeds)`` is the strict path: CUDA tensors on ``self.device`` with exactly the engine's dtypes
    (``self.inputs[name].dtype``), contiguous, within the optimisation profile; anything else raises
    ValueError naming the input. ``runner(z, cond)`` is the common runner interface on top of it: host
    (CPU) tensors are copied to ``self.device`` and made contiguous, dtypes are never converted.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike):
        trt = _import_tensorrt()
        engine_path = Path(engine_path)
        self.meta = json.loads(Path(f"{engine_path}.json").read_text())
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize TensorRT engine {engine_path} (built with another version?)")
        self.context = self.engine.create_execution_context()
        self.device = torch.device("cuda", torch.cuda.current_device())  # the context's device
        self.inputs, self.outputs = io_specs(self.engine)
        if set(self.inputs) != {"z", "cond"} or len(self.outputs) != 1:
            raise ValueError(f"{engine_path}: expected inputs z, cond and one output; the engine has inputs "
                             f"{sorted(self.inputs)} and outputs {sorted(self.outputs)}")
        self.output_name = next(iter(self.outputs))
        self.image_shape = tuple(self.meta["inputs"]["z"]["shape"][1:])
        self.num_classes = self.meta.get("num_classes")
        self.max_batch = self.inputs["z"].profile[2][0]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs by name for ``feeds`` (input name -> CUDA tensor); enqueued on the current stream."""
        bind_inputs(self.context, self.inputs, feeds, self.device)
        outs = {}
        for name, spec in self.outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT could not infer the shape of output {name!r} ({shape}) from the "
                                   f"inputs {({n: tuple(t.shape) for n, t in feeds.items()})}")
            outs[name] = torch.empty(shape, device=self.device, dtype=spec.dtype)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        # Tensors freed after return are safe: the caching allocator reuses them only for later work
        # on this same stream.
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return outs

    def __call__(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if z.shape[0] != cond.shape[0]:
            raise ValueError(f"z and cond disagree on the batch size: {z.shape[0]} vs {cond.shape[0]}")
        feeds = {"z": z, "cond": cond}
        feeds = {n: (t.to(self.device) if t.device.type == "cpu" else t).contiguous() for n, t in feeds.items()}
        return self.run(feeds)[self.output_name]
