"""ONNX -> TensorRT engine (tensorrt >= 10 Python API) and a runner over torch CUDA tensors.

TensorRT needs a CUDA host: ``pip install tensorrt`` (NVIDIA wheels, CUDA 12). Without it every
entry point raises TensorRTUnavailable naming the missing piece; use OnnxRuntimeRunner instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

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
    if int(trt.__version__.split(".")[0]) < 10:
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


class TensorRTRunner:
    """Runs a saved engine on the current CUDA stream; takes and returns torch CUDA tensors."""

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
        self.image_shape = tuple(self.meta["inputs"]["z"]["shape"][1:])
        self.num_classes = self.meta.get("num_classes")
        self.max_batch = self.meta["profile"]["max"]

    def __call__(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        if not 1 <= b <= self.max_batch:
            raise ValueError(f"batch {b} is outside the engine's profile 1..{self.max_batch}")
        z = z.to("cuda", torch.float32).contiguous()
        cond = cond.to("cuda").contiguous()
        out = torch.empty((b, *self.image_shape), device="cuda", dtype=torch.float32)
        for name, t in (("z", z), ("cond", cond)):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        self.context.set_tensor_address("image", out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out
