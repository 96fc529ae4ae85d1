"""One-step generator -> ONNX (checked in onnxruntime) -> TensorRT engine, and runners for both.

``to_onnx`` exports G(z, c) with a dynamic batch axis. ``c`` is int64 class labels (B,) or a
float conditioning embedding (B, ...) — the example tensor's dtype decides. The export is
verified against PyTorch in onnxruntime before the function returns; a sidecar JSON records
opset, shapes, versions and the measured max abs error.

``build_engine`` uses the TensorRT Python API (>= 10). TensorRT is an optional dependency that
installs only on a CUDA host (``pip install tensorrt``); without it ``load_runner`` returns the
onnxruntime runner, which has the same interface.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint_io import atomic_write_bytes

log = logging.getLogger(__name__)
OPSET = 18
INPUT_NAMES = ("z", "c")
OUTPUT_NAME = "images"
PRECISIONS = ("fp32", "fp16", "bf16")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "tensorrt"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def example_inputs(generator: nn.Module, batch: int = 2, cond: torch.Tensor | None = None, seed: int = 0):
    """(z, c) for tracing/parity: z ~ N(0, I) in the generator's image shape; c labels by default."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, *generator.denoiser.image_shape), generator=gen)
    if cond is None:
        cond = torch.randint(generator.denoiser.num_classes, (batch,), generator=gen)
    return z, cond


@torch.no_grad()
def to_onnx(generator: nn.Module, path: str | os.PathLike, *, cond: torch.Tensor | None = None,
            opset: int = OPSET, external_data: bool = False, parity_batches: tuple[int, ...] = (1, 3, 8),
            atol: float = 1e-4) -> dict:
    """Export G(z, c) to ``path`` (.onnx) and verify it in onnxruntime; returns the sidecar dict.

    cond: an example condition (int64 labels (B,) or float embeddings (B, ...)); labels by default.
    external_data: store weights beside the graph (needed above 2 GB). Raises if the onnxruntime
    output differs from PyTorch by more than ``atol`` for any batch size in ``parity_batches``.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"ONNX path must end with .onnx, got {str(path)!r}")
    generator = generator.eval().float().cpu()
    z, c = example_inputs(generator, 2, cond)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(
            generator, (z, c), dynamo=True, opset_version=opset, input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME], dynamic_shapes={"z": {0: batch}, "c": {0: batch}})
        program.save(str(tmp_path), external_data=external_data)
        for f in Path(tmp).iterdir():  # graph (+ external weights) land together
            os.replace(f, path.parent / f.name)
    errors = check_onnx_parity(generator, path, cond, parity_batches)
    worst = max(errors.values())
    if worst > atol:
        raise RuntimeError(f"onnxruntime differs from PyTorch by {worst:.3g} (> atol {atol}) for {str(path)!r}")
    meta = {
        "opset": opset, "inputs": {"z": ["batch", *generator.denoiser.image_shape],
                                   "c": ["batch", *c.shape[1:]], "c_dtype": str(c.dtype).replace("torch.", "")},
        "output": ["batch", *generator.denoiser.image_shape], "sigma_init": generator.sigma_init,
        "num_classes": generator.denoiser.num_classes, "external_data": external_data,
        "max_abs_error_vs_torch": errors, "versions": _versions(),
    }
    atomic_write_bytes(_sidecar(path), json.dumps(meta, indent=2).encode())
    return meta


@torch.no_grad()
def check_onnx_parity(generator: nn.Module, path: str | os.PathLike, cond: torch.Tensor | None = None,
                      batches: tuple[int, ...] = (1, 3, 8)) -> dict[str, float]:
    """Max abs difference between onnxruntime and PyTorch per batch size (fresh inputs each)."""
    runner = OnnxRuntimeRunner(path)
    errors = {}
    for i, b in enumerate(batches):
        example = None if cond is None else cond[:1].expand(b, *cond.shape[1:]).contiguous()
        z, c = example_inputs(generator, b, example, seed=100 + i)
        errors[str(b)] = float((runner(z, c) - generator(z, c)).abs().max())
    return errors


class OnnxRuntimeRunner:
    """Runs an exported generator in onnxruntime: ``runner(z, c) -> images`` on torch tensors."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}

    def __call__(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        feeds = {"z": z.detach().cpu().float().numpy(),
                 "c": c.detach().cpu().numpy().astype(np.int64 if "int64" in self.input_types["c"] else np.float32)}
        (out,) = self.session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(out).to(z.device)


# --------------------------------------------------------------------------- TensorRT

def tensorrt_status() -> tuple[bool, str]:
    """(True, "") when a TensorRT engine can be built here, else (False, why)."""
    if not torch.cuda.is_available():
        return False, "TensorRT needs a CUDA GPU; none is visible to torch"
    try:
        import tensorrt as trt
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # absent, or the PyPI stub without NVIDIA's libraries
        return False, f"tensorrt is not usable ({type(exc).__name__}: {exc}); install it on a CUDA host: pip install tensorrt"
    return True, ""


@dataclass(frozen=True)
class EngineProfile:
    """Batch sizes the engine is optimised for: min <= opt <= max."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 64

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self}")


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike | None = None, *,
                 precision: str = "fp16", profiles: tuple[EngineProfile, ...] = (EngineProfile(),),
                 timing_cache: str | os.PathLike | None = None, workspace_gib: float = 4.0) -> Path:
    """Build and save a TensorRT engine for an exported generator (sidecar JSON beside it).

    precision: "fp32" | "fp16" | "bf16" (fp16/bf16 allow reduced-precision kernels; I/O stays fp32).
    profiles: one optimisation profile per batch-size range. timing_cache: reused across builds.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; allowed: {PRECISIONS}")
    ok, why = tensorrt_status()
    if not ok:
        raise RuntimeError(why)
    import tensorrt as trt

    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(f".{precision}.engine")
    meta_onnx = json.loads(_sidecar(onnx_path).read_text())
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {str(onnx_path)!r}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    cache = None
    if timing_cache is not None:
        data = Path(timing_cache).read_bytes() if Path(timing_cache).exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    image_shape = tuple(meta_onnx["output"][1:])
    cond_tail = tuple(meta_onnx["inputs"]["c"][1:])
    for p in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape("z", (p.min_batch, *image_shape), (p.opt_batch, *image_shape), (p.max_batch, *image_shape))
        profile.set_shape("c", (p.min_batch, *cond_tail), (p.opt_batch, *cond_tail), (p.max_batch, *cond_tail))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {str(onnx_path)!r} (see its log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    if cache is not None:
        atomic_write_bytes(timing_cache, bytes(cache.serialize()))
    meta = {**meta_onnx, "precision": precision, "profiles": [p.__dict__ for p in profiles],
            "onnx": onnx_path.name, "versions": _versions()}
    atomic_write_bytes(_sidecar(engine_path), json.dumps(meta, indent=2).encode())
    return engine_path


class TensorRTRunner:
    """Runs a serialized engine on the current CUDA stream: ``runner(z, c) -> images`` (torch, GPU)."""

    backend = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike):
        ok, why = tensorrt_status()
        if not ok:
            raise RuntimeError(why)
        import tensorrt as trt

        self.meta = json.loads(_sidecar(Path(engine_path)).read_text())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {str(engine_path)!r} (version mismatch?)")
        self.context = self.engine.create_execution_context()
        self.cond_dtype = torch.int64 if self.meta["inputs"]["c_dtype"] == "int64" else torch.float32

    def __call__(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z = z.to("cuda", torch.float32).contiguous()
        c = c.to("cuda", self.cond_dtype).contiguous()
        out = torch.empty_like(z)
        self.context.set_input_shape("z", tuple(z.shape))
        self.context.set_input_shape("c", tuple(c.shape))
        for name, tensor in (("z", z), ("c", c), (OUTPUT_NAME, out)):
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out


def load_runner(path: str | os.PathLike):
    """A runner for ``path``: TensorRT for ``.engine`` files, onnxruntime for ``.onnx``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    if path.suffix == ".engine":
        return TensorRTRunner(path)
    if path.suffix == ".onnx":
        return OnnxRuntimeRunner(path)
    raise ValueError(f"unknown model file type {path.suffix!r}; allowed: .onnx, .engine")
