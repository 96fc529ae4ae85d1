"""Denoisers D(x, sigma, c) -> x0 over real diffusers UNets, and the one-step generator.

Every network in SFD (teacher f_phi, fake score f_psi, generator G_theta) is a *denoiser* in the
EDM sense: it maps a noisy image x = x0 + sigma * eps, its noise level sigma (shape (B,)) and a
condition c to an estimate of x0. Two parameterisations are supported:

- ``EDMDenoiser``: EDM preconditioning (Karras et al. 2022) around a class-conditional
  ``UNet2DModel``; the preconditioning is computed in fp32, apart from the network.
- ``DDPMDenoiser``: a DDPM epsilon- (or v-, or sample-) prediction ``UNet2DModel`` with its
  ``DDPMScheduler`` config, viewed as an x0 predictor (SPEC section 3): the input is scaled by
  sqrt(abar) and sigma is mapped to a (fractional) DDPM timestep.

The condition c is a LongTensor of class labels (B,), or a float tensor (B, E) holding class
*embeddings* directly (used by conditioning-space attacks and learned embeddings).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..io.atomic import CheckpointError
from .unet import _require_class_conditioning

DENOISER_META = "sfd_fast.json"  # sidecar naming the parameterisation of a saved denoiser


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """Preconditioning and loss arithmetic run in fp32 (float64 inputs stay float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as a tensor of shape (B, 1, 1, 1) in ``work_dtype(x)``, broadcastable against x."""
    sigma = torch.as_tensor(sigma, device=x.device).to(work_dtype(x))
    return sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float):
    """EDM's (c_skip, c_out, c_in, c_noise) for fp32 sigma of shape (B, 1, 1, 1)."""
    var = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = 1 / var.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMDenoiser(nn.Module):
    """D(x, sigma, c) = c_skip x + c_out F(c_in x, c_noise, c) with F a diffusers UNet2DModel."""

    kind = "edm"

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        _require_class_conditioning(unet)
        self.unet = unet
        self.sigma_data = float(sigma_data)

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (int(self.unet.config.in_channels), int(size), int(size))

    def network_output(self, x: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor):
        """(F, c_skip, c_out): the raw network output and the epilogue coefficients (fp32)."""
        sigma = batch_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        dtype = self.unet.dtype
        out = self.unet((c_in * x).to(dtype), c_noise.flatten(), class_labels=c).sample
        return out.to(c_out.dtype), c_skip, c_out

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out, c_skip, c_out = self.network_output(x, sigma, c)
        return c_skip * x.to(c_out.dtype) + c_out * out


class DDPMDenoiser(nn.Module):
    """A DDPM-trained diffusers UNet (epsilon/v/sample prediction) as an x0 denoiser.

    With abar(sigma) = 1 / (1 + sigma^2): x_ddpm = sqrt(abar) x, and for epsilon prediction
    D = (x_ddpm - sqrt(1 - abar) eps_hat) / sqrt(abar) = x - sigma * eps_hat (SPEC section 3).
    sigma is mapped to a fractional timestep by interpolating log sigma in the scheduler's table.
    """

    kind = "ddpm"
    PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

    def __init__(self, unet: nn.Module, scheduler_config: dict):
        super().__init__()
        from diffusers import DDPMScheduler

        _require_class_conditioning(unet)
        scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in self.PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported; "
                             f"allowed: {self.PREDICTION_TYPES}")
        self.unet = unet
        self.scheduler_config = dict(scheduler.config)
        abar = scheduler.alphas_cumprod.double()
        self.register_buffer("log_sigmas", (((1 - abar) / abar).sqrt().log()).float(), persistent=False)

    num_classes = EDMDenoiser.num_classes
    image_shape = EDMDenoiser.image_shape

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep whose noise level is sigma (clamped to the table's range)."""
        table = self.log_sigmas
        log_sigma = sigma.to(table.dtype).log().clamp(table[0], table[-1])
        hi = torch.searchsorted(table, log_sigma).clamp(1, table.numel() - 1)
        lo_val, hi_val = table[hi - 1], table[hi]
        return (hi - 1).float() + (log_sigma - lo_val) / (hi_val - lo_val)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)
        sqrt_abar = (1 + sigma ** 2).rsqrt()
        sqrt_one_minus = sigma * sqrt_abar
        x = x.to(sigma.dtype)
        x_in = sqrt_abar * x
        out = self.unet(x_in.to(self.unet.dtype), self.timestep(sigma.flatten()), class_labels=c).sample.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return sqrt_abar * x_in - sqrt_one_minus * out
        return out


class OneStepGenerator(nn.Module):
    """G(z, c) = D(sigma_init * z, sigma_init, c): the distilled one-step sampler."""

    def __init__(self, denoiser: nn.Module, sigma_init: float = 2.5):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device, dtype=torch.float32)
        return self.denoiser(self.sigma_init * z, sigma, c)


# --------------------------------------------------------------------------- persistence

def _replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished temp directory onto ``path`` so readers never see a half-written one."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_denoiser(denoiser: nn.Module, path: str | os.PathLike, extra_meta: dict | None = None) -> Path:
    """Save weights (safetensors) + configs (JSON) to a directory, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if isinstance(denoiser, EDMDenoiser):
            denoiser.unet.save_pretrained(tmp, safe_serialization=True)
            meta = {"kind": "edm", "sigma_data": denoiser.sigma_data}
        elif isinstance(denoiser, DDPMDenoiser):
            from diffusers import DDPMScheduler

            denoiser.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            DDPMScheduler.from_config(denoiser.scheduler_config).save_pretrained(tmp / "scheduler")
            meta = {"kind": "ddpm"}
        else:
            raise TypeError(f"save_denoiser expects an EDMDenoiser or DDPMDenoiser, got {type(denoiser).__name__}")
        (tmp / DENOISER_META).write_text(json.dumps({**meta, **(extra_meta or {})}, indent=2))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_denoiser(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a denoiser from a local directory (never from a hub, never via pickle).

    Accepted layouts: a directory written by ``save_denoiser`` (EDM or DDPM), or a diffusers
    DDPM pipeline directory holding ``unet/`` and ``scheduler/`` (e.g. ``DDPMPipeline.save_pretrained``).
    """
    from diffusers import DDPMScheduler, UNet2DModel

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    meta_file = path / DENOISER_META
    kind = json.loads(meta_file.read_text())["kind"] if meta_file.exists() else None
    if kind is None and (path / "unet").is_dir() and (path / "scheduler").is_dir():
        kind = "ddpm"
    if kind not in ("edm", "ddpm"):
        raise CheckpointError(
            f"{str(path)!r} is not a denoiser directory: expected {DENOISER_META} (written by "
            "sfd_fast.save_denoiser) or diffusers 'unet/' + 'scheduler/' subfolders")
    try:
        if kind == "edm":
            meta = json.loads(meta_file.read_text())
            unet = UNet2DModel.from_pretrained(path, use_safetensors=True)
            _require_class_conditioning(unet, where=f"the UNet in {str(path)!r}")
            model = EDMDenoiser(unet, sigma_data=meta.get("sigma_data", 0.5))
        else:
            unet = UNet2DModel.from_pretrained(path / "unet", use_safetensors=True)
            _require_class_conditioning(unet, where=f"the UNet in {str(path / 'unet')!r}")
            scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
            model = DDPMDenoiser(unet, dict(scheduler.config))
    except (ValueError, CheckpointError):
        raise
    except Exception as exc:  # diffusers/safetensors raise many types for a broken file
        raise CheckpointError(f"could not load the model in {str(path)!r}: {exc}") from exc
    return model.to(device).eval()


def save_generator(generator: OneStepGenerator, path: str | os.PathLike) -> Path:
    """A one-step generator is its denoiser plus sigma_init (stored in the sidecar JSON)."""
    return save_denoiser(generator.denoiser, path, {"role": "one_step_generator", "sigma_init": generator.sigma_init})


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> OneStepGenerator:
    meta_file = Path(path) / DENOISER_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("role") != "one_step_generator":
        raise CheckpointError(f"{str(path)!r} is not a one-step generator directory (written by save_generator); "
                              "to distil a teacher into one, run `sfd-fast distill`")
    return OneStepGenerator(load_denoiser(path, device), meta["sigma_init"]).eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "CheckpointError", "EDMDenoiser", "DDPMDenoiser", "OneStepGenerator", "build_unet",
    "edm_preconditioning", "batch_sigma", "save_denoiser", "load_denoiser", "save_generator", "load_generator", "count_parameters",
]
