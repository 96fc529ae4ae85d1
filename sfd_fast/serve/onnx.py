"""G(z, cond) -> ONNX with a dynamic batch axis, verified in onnxruntime before returning.

``to_onnx`` exports a generator; ``t2i_to_onnx`` exports a text-to-image generator together with
what serving a prompt needs beside it: the pipeline's text encoder and VAE decoder (both ONNX,
verified the same way) and its tokenizer. Every file is written into a staging folder first and
moved into place only once all of them verified, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..io.atomic import staging_dir

DEFAULT_OPSET = 18
OPSET_RANGE = (14, 20)  # what both exporters and onnxruntime handle here; TorchScript caps at 17
INPUT_NAMES = ("z", "cond")
OUTPUT_NAME = "image"
EXPORTERS = ("dynamo", "torchscript")
# Beside g.onnx: g.text_encoder.onnx, g.vae_decoder.onnx and the tokenizer folder g.tokenizer/.
T2I_PARTS = {"text_encoder": ("input_ids", "embeddings"), "vae_decoder": ("latents", "image")}


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


@contextlib.contextmanager
def _quiet_exporters():
    """The dynamo exporter logs one warning per torchvision op it skips (torchvision is not a
    dependency) and both exporters warn about tracing; none of it concerns the user."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_name: str, exporter: str,
            opset: int, external_data: bool) -> None:
    """Export ``module(*args)`` with a dynamic batch axis ("batch") on every input and the output."""
    with _quiet_exporters():
        if exporter == "dynamo":
            # AUTO, not Dim("batch", min, max): diffusers branches on the batch size (Upsample2D's
            # `shape[0] >= 64` contiguous()), which a declared range cannot satisfy; AUTO keeps the
            # batch symbolic, and that branch is a no-op in ONNX. Checked at several batches below.
            batch = torch.export.Dim.AUTO
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=[output_name],
                              dynamic_shapes=tuple({0: batch} for _ in args), opset_version=opset,
                              dynamo=True, external_data=external_data, verbose=False)
        else:
            axes = {name: {0: "batch"} for name in (*input_names, output_name)}
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=[output_name],
                              dynamic_axes=axes, opset_version=min(opset, 17), dynamo=False)


def _export_with_fallback(module, args, path, input_names, output_name, exporter, opset, external_data) -> str:
    """The exporter that worked: dynamo falls back to TorchScript (which traces some graphs dynamo rejects)."""
    try:
        _export(module, args, path, input_names, output_name, exporter, opset, external_data)
        return exporter
    except Exception as exc:
        if exporter != "dynamo":
            raise
        warnings.warn(f"dynamo ONNX export of {path.name} failed ({exc}); falling back to the TorchScript exporter")
        _export(module, args, path, input_names, output_name, "torchscript", opset, external_data)
        return "torchscript"


def _drop_noop_squeezes(path: Path) -> int:
    """Rewrite each ONNX Squeeze whose squeezed axes all have a static size != 1 into Identity; returns the count.

    torch's ``x.squeeze(d)`` is a no-op when dim d is not 1, and diffusers' PixArtTransformer2DModel ends with
    ``hidden_states.squeeze(1)`` on (B, tokens, C); both exporters keep it as a Squeeze that onnxruntime then
    refuses to load ("Dimension of input 1 must be 1 instead of 16"). Where the size is not static the node stays.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Squeeze" or len(node.input) < 2:
            continue
        axes, shape = consts.get(node.input[1]), shapes.get(node.input[0])
        if axes is None or not shape:
            continue
        if all(shape[a] is not None and shape[a] != 1 for a in axes.reshape(-1).tolist()):
            node.op_type = "Identity"
            del node.input[1:]
            changed += 1
    if changed:
        onnx.save(model, str(path))
    return changed


def _max_error(module: nn.Module, path: Path, feeds: dict[str, torch.Tensor]) -> float:
    """Max |ORT(feeds) - module(*feeds)| on CPU float32."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        ref = module(*feeds.values())
    return float((torch.from_numpy(out) - ref.float()).abs().max())


@contextlib.contextmanager
def _staged(path: Path):
    """A staging folder beside ``path``; on success its files move into ``path.parent`` (sidecar
    JSONs last, so a reader that sees ``<path>.json`` sees every file it names); on failure it is removed."""
    stage = staging_dir(path, "export")
    try:
        yield stage
        entries = sorted(stage.iterdir(), key=lambda e: e.name.endswith(".json"))
        for entry in entries:
            target = path.parent / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_args(exporter: str, opset: int, tolerance: float) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ValueError(f"opset must be an integer in [{OPSET_RANGE[0]}, {OPSET_RANGE[1]}], got {opset!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")


def verify_onnx(generator: nn.Module, path: str | os.PathLike, z: torch.Tensor, cond: torch.Tensor) -> float:
    """Max |ORT(z, cond) - G(z, cond)| on CPU float32."""
    return _max_error(generator, Path(path), {"z": z, "cond": cond})


def to_onnx(generator: nn.Module, path: str | os.PathLike, *, cond: torch.Tensor | None = None,
            opset: int = DEFAULT_OPSET, exporter: str = "dynamo", external_data: bool | None = None,
            tolerance: float = 1e-4, verify_batches: tuple[int, ...] = (1, 3)) -> ExportResult:
    """Export ``generator(z, cond)`` to ``path`` and check it in onnxruntime.

    z: (B, C, H, W) float32. cond: an example whose dtype decides the conditioning input: int64 (B,)
    class labels, or float (B, L, D) embeddings (text-to-image). Batch is dynamic ("batch").
    exporter: "dynamo" (torch.export + onnxscript) falls back to "torchscript" if it fails.
    external_data: weights beside the .onnx (needed past 2 GB); default: only for > 1.5 GB of weights.
    Writes ``path.json`` (opset, exporter, shapes, versions, max_abs_error); raises if error > tolerance,
    and then writes nothing.
    """
    path = Path(path)
    _check_args(exporter, opset, tolerance)
    with _staged(path) as stage:
        result, meta = _generator_to_onnx(generator, stage / path.name, cond, opset, exporter, external_data,
                                          tolerance, verify_batches)
        result.path = str(path)
        (stage / f"{path.name}.json").write_text(json.dumps({**meta, "path": str(path)}, indent=2))
    return result


def _generator_to_onnx(generator, path: Path, cond, opset, exporter, external_data, tolerance, verify_batches):
    """(ExportResult, sidecar dict) of G exported to ``path`` (a staging path); raises above tolerance."""
    # Export a copy: the caller's generator (maybe bf16, on a GPU, in training) stays as it is.
    generator = copy.deepcopy(generator).cpu().float().eval()
    shape = tuple(generator.denoiser.image_shape)
    if cond is None:
        cond = example_cond(generator, 2)
    if cond.dtype not in (torch.int64, torch.float32):
        raise ValueError(f"cond must be int64 labels (B,) or float32 embeddings (B, L, D), got dtype {cond.dtype}")
    cond = cond.detach().cpu()
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in generator.parameters()) > 1.5e9
    z = torch.randn(cond.shape[0], *shape, generator=torch.Generator().manual_seed(0))
    used = _export_with_fallback(generator, (z, cond), path, list(INPUT_NAMES), OUTPUT_NAME, exporter, opset,
                                 external_data)
    if cond.dtype == torch.float32 and not external_data:  # text-to-image transformers (PixArt)
        _drop_noop_squeezes(path)
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
    if not err <= tolerance:  # also catches NaN
        raise RuntimeError(f"ONNX export of {path.name} does not match PyTorch: max abs error {err:.3g} > "
                           f"tolerance {tolerance:g}; nothing was written")
    return result, meta


class _TextEncoder(nn.Module):
    """token ids (B, L) int64 -> text embeddings (B, L, D) float32, as ``T2IPipeline.encode_prompts``."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0].float()


class _VaeDecoder(nn.Module):
    """SD latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1], as ``T2IPipeline.decode``."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample.float().clamp(-1, 1)


def t2i_part_paths(path: str | os.PathLike) -> dict[str, Path]:
    """Where ``t2i_to_onnx(..., path)`` puts the parts beside ``path`` (g.onnx -> g.text_encoder.onnx, ...)."""
    path = Path(path)
    stem = path.name.removesuffix(".onnx")
    return {**{part: path.with_name(f"{stem}.{part}.onnx") for part in T2I_PARTS},
            "tokenizer": path.with_name(f"{stem}.tokenizer")}


def t2i_to_onnx(generator: nn.Module, pipeline, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                exporter: str = "dynamo", tolerance: float = 1e-4,
                verify_batches: tuple[int, ...] = (1, 3)) -> dict[str, ExportResult]:
    """Export a text-to-image G(z, text embeddings) -> latents and what serving a prompt needs.

    ``pipeline`` is the generator folder's ``T2IPipeline``. Writes ``path`` (G), its ``path.json``
    sidecar (with a ``text_to_image`` section naming the parts), the text encoder
    (input_ids (B, L) int64 -> embeddings (B, L, D)) and the VAE decoder (latents -> images in
    [-1, 1]) as ONNX beside it, each verified in onnxruntime at ``verify_batches`` against PyTorch,
    and the tokenizer's files. Returns each part's ExportResult ("generator", "text_encoder",
    "vae_decoder"). Any part above ``tolerance`` raises, and then nothing is written.
    """
    path = Path(path)
    _check_args(exporter, opset, tolerance)
    kind = getattr(pipeline, "kind", "sd")
    if kind != "sd":  # several text encoders, pooled/masked conditions: no single encoder graph yet
        raise ValueError(f"exporting the text encoder and VAE with G is for StableDiffusionPipeline generators; this "
                         f"is a {pipeline.pipeline_class} one: export G alone with sfd_fast.serve.to_onnx(generator, "
                         "path, cond=pipeline.encode_prompts([...])) (inputs z and the packed condition)")
    tokenizer = pipeline.tokenizer
    max_length = int(tokenizer.model_max_length)
    example_ids = tokenizer(["a photo of a cat", ""], padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="pt").input_ids
    cond = pipeline.encode_prompts(["a photo of a cat", ""]).detach().cpu().float()
    parts = t2i_part_paths(path)
    latent_shape = tuple(generator.denoiser.image_shape)
    modules = {"text_encoder": _TextEncoder(copy.deepcopy(pipeline.text_encoder).cpu().float().eval()),
               "vae_decoder": _VaeDecoder(copy.deepcopy(pipeline.vae).cpu().float().eval())}
    with torch.no_grad():
        image_shape = tuple(modules["vae_decoder"](torch.zeros(1, *latent_shape)).shape[1:])
    examples = {"text_encoder": example_ids, "vae_decoder": torch.randn(2, *latent_shape)}
    vocab = int(pipeline.text_encoder.config.vocab_size)

    def random_feed(part: str, b: int, gen: torch.Generator) -> torch.Tensor:
        if part == "text_encoder":
            return torch.randint(0, vocab, (b, max_length), generator=gen)
        return torch.randn(b, *latent_shape, generator=gen)

    results: dict[str, ExportResult] = {}
    with _staged(path) as stage:
        results["generator"], meta = _generator_to_onnx(generator, stage / path.name, cond, opset, exporter, None,
                                                        tolerance, verify_batches)
        results["generator"].path = str(path)
        section = {"max_length": max_length, "latent_shape": list(latent_shape), "image_shape": list(image_shape),
                   "tokenizer": parts["tokenizer"].name}
        for part, module in modules.items():
            target = stage / parts[part].name
            used = _export_with_fallback(module, (examples[part],), target, [T2I_PARTS[part][0]], T2I_PARTS[part][1],
                                         exporter, opset, False)
            err = max(_max_error(module, target, {T2I_PARTS[part][0]: random_feed(part, b, torch.Generator().manual_seed(b))})
                      for b in verify_batches)
            if not err <= tolerance:
                raise RuntimeError(f"ONNX export of the {part} does not match PyTorch: max abs error {err:.3g} > "
                                   f"tolerance {tolerance:g}; nothing was written")
            results[part] = ExportResult(str(parts[part]), used, results["generator"].opset, err, tolerance,
                                         {T2I_PARTS[part][0]: {"shape": ["batch", *examples[part].shape[1:]]}},
                                         {T2I_PARTS[part][1]: {"shape": ["batch", *(image_shape if part == "vae_decoder" else cond.shape[1:])]}},
                                         results["generator"].versions)
            section[part] = {"file": parts[part].name, "exporter": used, "max_abs_error": err}
        tokenizer.save_pretrained(stage / parts["tokenizer"].name)
        (stage / f"{path.name}.json").write_text(json.dumps({**meta, "path": str(path), "text_to_image": section},
                                                            indent=2))
    return results
