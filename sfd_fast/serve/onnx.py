"""G(z, cond) -> ONNX with a dynamic batch axis, verified in onnxruntime before returning."""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_OPSET = 18
INPUT_NAMES = ("z", "cond")
OUTPUT_NAME = "image"
EXPORTERS = ("dynamo", "torchscript")


@dataclass
class ExportResult:
    path: str
    exporter: str
    opset: int
    max_abs_error: float
    tolerance: float
    inputs: dict
    output: dict
    versions: dict


def _versions() -> dict:
    import onnx
    import onnxruntime
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def example_cond(generator: nn.Module, batch: int) -> torch.Tensor:
    """Class labels (B,) int64 for a class-conditional generator."""
    return torch.arange(batch, dtype=torch.int64) % generator.denoiser.num_classes


def _export(generator, args, path: Path, exporter: str, opset: int, external_data: bool) -> None:
    names = {"z": {0: "batch"}, "cond": {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            # AUTO, not Dim("batch", min, max): diffusers branches on the batch size (Upsample2D's
            # `shape[0] >= 64` contiguous()), which a declared range cannot satisfy; AUTO keeps the
            # batch symbolic, and that branch is a no-op in ONNX. Checked at several batches below.
            batch = torch.export.Dim.AUTO
            torch.onnx.export(generator, args, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                              dynamic_shapes={"z": {0: batch}, "c": {0: batch}}, opset_version=opset,
                              dynamo=True, external_data=external_data, verbose=False)
        else:
            torch.onnx.export(generator, args, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                              dynamic_axes=names, opset_version=min(opset, 17), dynamo=False)


def verify_onnx(generator: nn.Module, path: str | os.PathLike, z: torch.Tensor, cond: torch.Tensor) -> float:
    """Max |ORT(z, cond) - G(z, cond)| on CPU float32."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"z": z.numpy(), "cond": cond.numpy()})[0]
    with torch.no_grad():
        ref = generator(z, cond)
    return float((torch.from_numpy(out) - ref).abs().max())


def to_onnx(generator: nn.Module, path: str | os.PathLike, *, cond: torch.Tensor | None = None,
            opset: int = DEFAULT_OPSET, exporter: str = "dynamo", external_data: bool | None = None,
            tolerance: float = 1e-4, verify_batches: tuple[int, ...] = (1, 3)) -> ExportResult:
    """Export ``generator(z, cond)`` to ``path`` and check it in onnxruntime.

    z: (B, C, H, W) float32. cond: an example whose dtype decides the conditioning input: int64 (B,)
    class labels, or float (B, L, D) embeddings (text-to-image). Batch is dynamic ("batch").
    exporter: "dynamo" (torch.export + onnxscript) falls back to "torchscript" if it fails.
    external_data: weights beside the .onnx (needed past 2 GB); default: only for > 1.5 GB of weights.
    Writes ``path.json`` (opset, exporter, shapes, versions, max_abs_error); raises if error > tolerance.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Export a copy: the caller's generator (maybe bf16, on a GPU, in training) stays as it is.
    generator = copy.deepcopy(generator).cpu().float().eval()
    shape = tuple(generator.denoiser.image_shape)
    if cond is None:
        cond = example_cond(generator, 2)
    if cond.dtype not in (torch.int64, torch.float32):
        raise ValueError(f"cond must be int64 labels (B,) or float32 embeddings (B, L, D), got dtype {cond.dtype}")
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in generator.parameters()) > 1.5e9
    z = torch.randn(cond.shape[0], *shape, generator=torch.Generator().manual_seed(0))
    used = exporter
    try:
        _export(generator, (z, cond), path, exporter, opset, external_data)
    except Exception as exc:  # the dynamo exporter rejects some graphs; TorchScript traces them
        if exporter != "dynamo":
            raise
        warnings.warn(f"dynamo ONNX export failed ({exc}); falling back to the TorchScript exporter")
        used = "torchscript"
        _export(generator, (z, cond), path, used, opset, external_data)
    import onnx
    opset_used = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))

    errors = []
    for b in verify_batches:
        gen = torch.Generator().manual_seed(b)
        zb = torch.randn(b, *shape, generator=gen)
        if cond.dtype == torch.int64:
            cb = torch.randint(0, generator.denoiser.num_classes, (b,), generator=gen)
        else:
            cb = torch.randn(b, *cond.shape[1:], generator=gen)
        errors.append(verify_onnx(generator, path, zb, cb))
    err = max(errors)
    result = ExportResult(
        path=str(path), exporter=used, opset=opset_used, max_abs_error=err, tolerance=tolerance,
        inputs={"z": {"dtype": "float32", "shape": ["batch", *shape]},
                "cond": {"dtype": str(cond.dtype).removeprefix("torch."), "shape": ["batch", *cond.shape[1:]]}},
        output={OUTPUT_NAME: {"dtype": "float32", "shape": ["batch", *shape]}},
        versions=_versions())
    meta = {**asdict(result), "verified_batches": list(verify_batches),
            "sigma_init": getattr(generator, "sigma_init", None),
            "num_classes": getattr(generator.denoiser, "num_classes", None)}
    Path(f"{path}.json").write_text(json.dumps(meta, indent=2))
    if not err <= tolerance:  # also catches NaN
        raise RuntimeError(f"ONNX export of {path} does not match PyTorch: max abs error {err:.3g} > tolerance {tolerance:g}")
    return result
