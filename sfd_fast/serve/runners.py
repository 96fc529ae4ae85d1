"""Runners: one interface, ``runner(z (B,C,H,W) float32, cond) -> images``.

Class-conditional runners take ``cond`` (B,) int64 labels and expose ``num_classes``. The
text-to-image runner also has ``encode_prompts(prompts) -> cond`` (B, L, D) and ``noise_shape``
(the latent shape of z; ``image_shape`` is then the decoded images' shape).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

from ..io.atomic import CheckpointError, read_json_object


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
        onnx_path = Path(onnx_path)
        meta = read_sidecar(onnx_path)
        self.session = _session(onnx_path, providers, threads)
        self.image_shape = tuple(meta["inputs"]["z"]["shape"][1:])
        self.num_classes = meta.get("num_classes")
        self.meta = meta

    def __call__(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"z": z.detach().cpu().float().numpy(), "cond": cond.detach().cpu().numpy()})[0]
        return torch.from_numpy(out).to(z.device)


def read_sidecar(onnx_path: Path) -> dict:
    """The ``<file>.onnx.json`` written by the exporter; FileNotFoundError naming what to run when missing."""
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {str(onnx_path)!r} does not exist; create it with `sfd-fast export`")
    meta_file = Path(f"{onnx_path}.json")
    if not meta_file.is_file():
        raise FileNotFoundError(f"sidecar {str(meta_file)!r} is missing; re-export with sfd_fast.serve.to_onnx")
    return read_json_object(meta_file, "the ONNX sidecar")


def _session(onnx_path: Path, providers: list[str] | None, threads: int | None):
    """An onnxruntime session (CUDA provider when present, else CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    available = ort.get_available_providers()
    providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as exc:  # onnxruntime's InvalidProtobuf / Fail / InvalidGraph share no public base
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{str(onnx_path)!r} is not a loadable ONNX model ({first}); re-export it with "
                              "`sfd-fast export`") from None


class TextToImageRunner:
    """A text-to-image export served from prompts, every network in onnxruntime.

    prompt -> tokenizer (transformers, in Python) -> text encoder (ONNX) -> G (ONNX) -> VAE decoder
    (ONNX) -> images (B, 3, H, W) in [-1, 1]. Reads the parts that ``sfd_fast.serve.onnx.t2i_to_onnx``
    (``sfd-fast export`` on a text-to-image generator folder) names in the sidecar's ``text_to_image``.
    """

    name = "onnxruntime"
    num_classes = None
    CACHE_SIZE = 1024  # prompt embeddings kept (least recently used dropped): repeated prompts skip the encoder

    def __init__(self, onnx_path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
        from transformers import CLIPTokenizer

        onnx_path = Path(onnx_path)
        meta = read_sidecar(onnx_path)
        section = meta.get("text_to_image")
        if not section:
            raise ValueError(f"{str(onnx_path)!r} is not a text-to-image export (its sidecar has no text_to_image "
                             "section); export a text-to-image generator folder with `sfd-fast export`")
        folder = onnx_path.parent
        missing = [str(folder / section[k]["file"]) for k in ("text_encoder", "vae_decoder")
                   if not (folder / section[k]["file"]).is_file()]
        if not (folder / section["tokenizer"]).is_dir():
            missing.append(str(folder / section["tokenizer"]))
        if missing:
            raise FileNotFoundError(f"text-to-image export {str(onnx_path)!r} lacks {missing}; re-export it with "
                                    "`sfd-fast export`")
        self.generator = OnnxRuntimeRunner(onnx_path, providers, threads)
        self.text_encoder = _session(folder / section["text_encoder"]["file"], providers, threads)
        self.vae_decoder = _session(folder / section["vae_decoder"]["file"], providers, threads)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / section["tokenizer"])
        self.max_length = int(section["max_length"])
        self.noise_shape = tuple(section["latent_shape"])
        self.image_shape = tuple(section["image_shape"])
        self.meta = meta
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (N, L, D) float32 of N prompts, as ``T2IPipeline.encode_prompts``."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="np").input_ids.astype("int64")
            hidden = torch.from_numpy(self.text_encoder.run(None, {"input_ids": ids})[0])
            self._cache.update(zip(missing, hidden))
        for p in prompts:
            self._cache.move_to_end(p)
        out = torch.stack([self._cache[p] for p in prompts])
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return out

    def __call__(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from latent noise z (B, *noise_shape) and embeddings cond (B, L, D)."""
        latents = self.generator(z, cond)
        out = self.vae_decoder.run(None, {"latents": latents.detach().cpu().float().numpy()})[0]
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
    if read_sidecar(path).get("text_to_image"):
        return TextToImageRunner(path)
    return OnnxRuntimeRunner(path)
