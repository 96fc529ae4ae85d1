"""Runners: one interface, ``runner(z (B,C,H,W) float32, cond (B,) int64) -> images (B,C,H,W)``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class TorchRunner:
    """PyTorch eager (or torch.compile'd) generator behind the runner interface."""

    name = "torch"

    def __init__(self, generator, device: str | torch.device = "cpu", compile: bool = False):
        self.generator = generator.to(device).eval()
        self.device = torch.device(device)
        self.image_shape = tuple(generator.denoiser.image_shape)
        self.num_classes = generator.denoiser.num_classes
        self._fn = torch.compile(self.generator) if compile else self.generator
        if compile:
            self.name = "torch.compile"

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._fn(z.to(self.device), cond.to(self.device))


class OnnxRuntimeRunner:
    """onnxruntime session over an exported .onnx (CUDA provider when present, else CPU)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX file {str(onnx_path)!r} does not exist; create it with `sfd-fast export`")
        meta_file = Path(f"{onnx_path}.json")
        if not meta_file.is_file():
            raise FileNotFoundError(f"sidecar {str(meta_file)!r} is missing; re-export with sfd_fast.serve.to_onnx")
        meta = json.loads(meta_file.read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.image_shape = tuple(meta["inputs"]["z"]["shape"][1:])
        self.num_classes = meta.get("num_classes")
        self.meta = meta

    def __call__(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"z": z.detach().cpu().float().numpy(), "cond": cond.detach().cpu().numpy()})[0]
        return torch.from_numpy(out).to(z.device)


def load_runner(path: str | os.PathLike, backend: str = "auto"):
    """A runner for ``path``: a .engine (TensorRT) or .onnx (onnxruntime).

    backend "auto": TensorRT for .engine files (error if TensorRT/CUDA missing), onnxruntime for .onnx.
    """
    path = Path(path)
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        raise ValueError(f"backend must be 'auto', 'onnxruntime' or 'tensorrt', got {backend!r}")
    if backend == "tensorrt" or (backend == "auto" and path.suffix == ".engine"):
        from .tensorrt import TensorRTRunner
        return TensorRTRunner(path)
    if path.suffix != ".onnx":
        raise ValueError(f"expected a .onnx or .engine file, got {str(path)!r}")
    return OnnxRuntimeRunner(path)
