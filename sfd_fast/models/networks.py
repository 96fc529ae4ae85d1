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
from pathlib import Path

import torch
from torch import nn

from ..io.atomic import CheckpointError, check_replaceable, read_json_object, replace_dir, staging_dir
from .ddpm_schedule import log_sigma_table, timestep_of_sigma
from .unet import _require_class_conditioning, resize_class_table, unet_image_shape

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

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, null_label: int | None = None):
        super().__init__()
        _require_class_conditioning(unet)
        self.unet = unet
        self.sigma_data = float(sigma_data)
        self.null_label = _check_null_label(null_label, int(unet.config.num_class_embeds))

    @property
    def num_classes(self) -> int:
        """Real classes: the class-embedding rows, less the null row when there is one."""
        return int(self.unet.config.num_class_embeds) - (self.null_label is not None)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return unet_image_shape(self.unet)

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


def _check_null_label(null_label, rows: int) -> int | None:
    """The unconditional label of a teacher trained with label dropout: its last embedding row (DiT's layout)."""
    if null_label is None:
        return None
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label != rows - 1 or rows < 3:
        raise ValueError(f"null_label must be the last class-embedding row ({rows - 1} of num_class_embeds={rows}, "
                         f"leaving at least 2 real classes), got {null_label!r}")
    return null_label


class DDPMDenoiser(nn.Module):
    """A DDPM-trained diffusers UNet (epsilon/v/sample prediction) as an x0 denoiser.

    With abar(sigma) = 1 / (1 + sigma^2): x_ddpm = sqrt(abar) x, and for epsilon prediction
    D = (x_ddpm - sqrt(1 - abar) eps_hat) / sqrt(abar) = x - sigma * eps_hat (SPEC section 3).
    sigma is mapped to a fractional timestep by interpolating log sigma in the scheduler's table
    (``ddpm_schedule.timestep_of_sigma``, shared with the latent adapter and ONNX-exportable).
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
        self.register_buffer("log_sigmas", log_sigma_table(scheduler.alphas_cumprod), persistent=False)

    num_classes = EDMDenoiser.num_classes
    null_label = None  # DDPM teachers come from diffusers folders, which have no null-label convention
    image_shape = EDMDenoiser.image_shape

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep (B,) whose noise level is sigma (B,) (clamped to the table's range)."""
        return timestep_of_sigma(sigma, self.log_sigmas)

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
    """G(z, c) = D(sigma_init * z, sigma_init, c): the distilled one-step sampler.

    On disk a class-label generator is a diffusers ``OneStepPipeline`` folder (``save_pretrained`` /
    ``from_pretrained``, i.e. ``save_generator`` / ``load_generator``); ``to_pipeline()`` is that
    pipeline in memory, sharing this generator's UNet.
    """

    def __init__(self, denoiser: nn.Module, sigma_init: float = 2.5):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device, dtype=torch.float32)
        return self.denoiser(self.sigma_init * z, sigma, c)

    def one_step_scheduler(self):
        """The diffusers scheduler whose single step reproduces G (see ``models/one_step_pipeline.py``)."""
        from .one_step_pipeline import one_step_edm_scheduler, one_step_euler_scheduler

        if isinstance(self.denoiser, EDMDenoiser):
            return one_step_edm_scheduler(self.sigma_init, self.denoiser.sigma_data)
        if isinstance(self.denoiser, DDPMDenoiser):
            return one_step_euler_scheduler(self.denoiser.scheduler_config, self.sigma_init)
        raise TypeError(f"a class-label one-step pipeline needs an EDMDenoiser or DDPMDenoiser generator, got "
                        f"{type(self.denoiser).__name__}; text-to-image generators are saved with "
                        "sfd_fast.train.text_to_image.save_t2i_generator as StableDiffusionPipeline folders")

    def to_pipeline(self):
        """This generator as a ``OneStepPipeline`` (components share this generator's UNet)."""
        from .one_step_pipeline import OneStepPipeline

        unet = self.denoiser.unet
        if getattr(self.denoiser, "null_label", None) is not None:
            # G is never asked for the null label (it came with the teacher's table): the folder holds
            # the real classes only, so the pipeline's classes are the teacher's classes.
            unet = resize_class_table(unet, int(unet.config.num_class_embeds) - 1)
        return OneStepPipeline(unet=unet, scheduler=self.one_step_scheduler())

    @classmethod
    def from_pipeline(cls, pipeline) -> "OneStepGenerator":
        """The generator a ``OneStepPipeline`` samples (sharing its UNet), as our denoiser over that UNet."""
        from diffusers import EDMEulerScheduler, EulerDiscreteScheduler

        from .one_step_pipeline import training_schedule

        scheduler = pipeline.scheduler
        if isinstance(scheduler, EDMEulerScheduler):
            denoiser = EDMDenoiser(pipeline.unet, sigma_data=scheduler.config.sigma_data)
        elif isinstance(scheduler, EulerDiscreteScheduler):
            denoiser = DDPMDenoiser(pipeline.unet, training_schedule(dict(scheduler.config)))
        else:
            raise TypeError(f"cannot read a one-step generator from a {type(scheduler).__name__}")
        return cls(denoiser, float(scheduler.config.sigma_max))

    def save_pretrained(self, path: str | os.PathLike, record=None) -> Path:
        """``save_generator(self, path, record)``."""
        return save_generator(self, path, record)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "OneStepGenerator":
        """``load_generator(path, device)``."""
        return load_generator(path, device)


# --------------------------------------------------------------------------- persistence

def save_denoiser(denoiser: nn.Module, path: str | os.PathLike, extra_meta: dict | None = None,
                  overwrite: bool = False) -> Path:
    """Save weights (safetensors) + configs (JSON) to a directory, atomically.

    An existing ``path`` is replaced only if this library wrote it (or it is empty), unless ``overwrite``.
    """
    path = Path(path)
    tmp = staging_dir(path)
    try:
        if isinstance(denoiser, EDMDenoiser):
            denoiser.unet.save_pretrained(tmp, safe_serialization=True)
            meta = {"kind": "edm", "sigma_data": denoiser.sigma_data}
            if denoiser.null_label is not None:
                meta["null_label"] = denoiser.null_label
        elif isinstance(denoiser, DDPMDenoiser):
            from diffusers import DDPMScheduler

            denoiser.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            DDPMScheduler.from_config(denoiser.scheduler_config).save_pretrained(tmp / "scheduler")
            meta = {"kind": "ddpm"}
        else:
            raise TypeError(f"save_denoiser expects an EDMDenoiser or DDPMDenoiser, got {type(denoiser).__name__}")
        (tmp / DENOISER_META).write_text(json.dumps({**meta, **(extra_meta or {})}, indent=2))
        replace_dir(tmp, path, overwrite)
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
    from diffusers.utils import is_accelerate_available

    # diffusers' low-memory loading needs accelerate and otherwise prints a 5-line notice on every
    # load; it is only asked for where it can run (the result is the same model either way).
    quiet = {"low_cpu_mem_usage": is_accelerate_available()}
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    meta_file = path / DENOISER_META
    meta = read_json_object(meta_file, "the model's sidecar") if meta_file.exists() else {}
    kind = meta.get("kind")
    if kind is None and (path / "unet").is_dir() and (path / "scheduler").is_dir():
        kind = "ddpm"
    if kind not in ("edm", "ddpm"):
        raise CheckpointError(
            f"{str(path)!r} is not a denoiser directory: expected {DENOISER_META} (written by "
            "sfd_fast.save_denoiser) or diffusers 'unet/' + 'scheduler/' subfolders")
    try:
        if kind == "edm":
            unet = UNet2DModel.from_pretrained(path, use_safetensors=True, **quiet)
            _require_class_conditioning(unet, where=f"the UNet in {str(path)!r}")
            try:  # folders written before label dropout have no null label
                model = EDMDenoiser(unet, sigma_data=meta.get("sigma_data", 0.5), null_label=meta.get("null_label"))
            except ValueError as exc:
                raise CheckpointError(f"{str(meta_file)!r}: {exc}") from None
        else:
            unet = UNet2DModel.from_pretrained(path / "unet", use_safetensors=True, **quiet)
            _require_class_conditioning(unet, where=f"the UNet in {str(path / 'unet')!r}")
            scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
            model = DDPMDenoiser(unet, dict(scheduler.config))
    except (ValueError, CheckpointError):
        raise
    except Exception as exc:  # diffusers/safetensors raise many types for a broken file
        raise CheckpointError(f"could not load the model in {str(path)!r}: {exc}") from exc
    return model.to(device).eval()


GENERATOR_ROLE = "one_step_generator"   # the sidecar's "role" of a class-label generator folder
PIPELINE_LAYOUT = "one_step_pipeline"   # the sidecar's "layout" of folders with model_index.json


def save_generator(generator: OneStepGenerator, path: str | os.PathLike, record=None, overwrite: bool = False) -> Path:
    """Write a class-label generator as a diffusers ``OneStepPipeline`` folder, atomically.

    Layout: ``model_index.json``, ``unet/`` (config + safetensors), ``scheduler/`` (the one-step
    scheduler), ``README.md`` (model card; ``record``, a ``model_card.RunRecord``, adds the teacher,
    forgotten classes, config and metrics) and ``sfd_fast.json`` (role, kind, sigma_init).
    """
    from .model_card import RunRecord

    path = Path(path)
    pipeline = generator.to_pipeline()  # raises TypeError for a denoiser it cannot express
    tmp = staging_dir(path)
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        denoiser = generator.denoiser
        meta = {"role": GENERATOR_ROLE, "layout": PIPELINE_LAYOUT, "kind": denoiser.kind,
                "sigma_init": generator.sigma_init}
        if isinstance(denoiser, EDMDenoiser):
            meta["sigma_data"] = denoiser.sigma_data
        (tmp / DENOISER_META).write_text(json.dumps(meta, indent=2))
        _class_generator_card(generator, pipeline, record or RunRecord()).write(tmp)
        replace_dir(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> OneStepGenerator:
    """A generator folder back as a ``OneStepGenerator`` (safetensors only, never unpickled).

    Reads the ``OneStepPipeline`` layout of ``save_generator`` and the older layout it replaced
    (a ``save_denoiser`` folder whose ``sfd_fast.json`` has role one_step_generator and sigma_init).
    """
    path = Path(path)
    meta_file = path / DENOISER_META
    meta = read_json_object(meta_file, "the generator's sidecar") if meta_file.exists() else {}
    if (path / "model_index.json").is_file():
        return _load_pipeline_generator(path, meta, device)
    if meta.get("role") != GENERATOR_ROLE:
        raise CheckpointError(f"{str(path)!r} is not a one-step generator directory (written by save_generator); "
                              "to distil a teacher into one, run `sfd-fast distill`")
    return OneStepGenerator(load_denoiser(path, device), meta["sigma_init"]).eval()


def _load_pipeline_generator(path: Path, meta: dict, device) -> OneStepGenerator:
    from diffusers import UNet2DModel

    from .one_step_pipeline import ONE_STEP_SCHEDULERS, OneStepPipeline

    try:
        index = json.loads((path / "model_index.json").read_text())
        scheduler_name = json.loads((path / "scheduler" / "scheduler_config.json").read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable one-step pipeline folder: {exc}") from exc
    if index.get("_class_name") != "OneStepPipeline":
        raise CheckpointError(f"{str(path)!r} holds a {index.get('_class_name')} folder, not a class-label one-step "
                              "generator; text-to-image generators load with StableDiffusionPipeline.from_pretrained "
                              "or sfd_fast.train.text_to_image.load_t2i_generator")
    if scheduler_name not in ONE_STEP_SCHEDULERS:
        raise CheckpointError(f"the scheduler in {str(path / 'scheduler')!r} is {scheduler_name!r}; a one-step "
                              f"generator has one of {sorted(ONE_STEP_SCHEDULERS)}")
    try:
        from diffusers.utils import is_accelerate_available  # low-memory loading only where it runs: else a notice

        unet = UNet2DModel.from_pretrained(path / "unet", use_safetensors=True,
                                           low_cpu_mem_usage=is_accelerate_available())
        _require_class_conditioning(unet, where=f"the UNet in {str(path / 'unet')!r}")
        scheduler = ONE_STEP_SCHEDULERS[scheduler_name].from_pretrained(path / "scheduler")
        generator = OneStepGenerator.from_pipeline(OneStepPipeline(unet=unet, scheduler=scheduler))
    except (ValueError, CheckpointError):
        raise
    except Exception as exc:  # diffusers/safetensors raise many types for a broken file
        raise CheckpointError(f"could not load the generator in {str(path)!r}: {exc}") from exc
    if "sigma_init" in meta and abs(float(meta["sigma_init"]) - generator.sigma_init) > 1e-6 * generator.sigma_init:
        raise CheckpointError(f"{str(path)!r} is inconsistent: {DENOISER_META} says sigma_init={meta['sigma_init']} "
                              f"but the scheduler's one step starts at sigma_max={generator.sigma_init}")
    return generator.to(device).eval()


def _class_generator_card(generator: OneStepGenerator, pipeline, record):
    from .model_card import TAGS, ModelCard

    scheduler = type(pipeline.scheduler).__name__
    c, h, w = pipeline.image_shape
    d = generator.denoiser
    kind = (f"EDM-preconditioned UNet2DModel (sigma_data {d.sigma_data})" if isinstance(d, EDMDenoiser)
            else f"DDPM {d.prediction_type}-prediction UNet2DModel")
    with_sfd = (
        "import torch\n"
        "from sfd_fast import OneStepPipeline\n\n"
        "pipe = OneStepPipeline.from_pretrained(\"path/to/generator\")\n"
        "images = pipe([0, 1, 2], generator=torch.Generator().manual_seed(0)).images  # PIL, one step each\n")
    stock = (
        "import torch\n"
        f"from diffusers import UNet2DModel, {scheduler}\n\n"
        "unet = UNet2DModel.from_pretrained(\"path/to/generator\", subfolder=\"unet\")\n"
        f"scheduler = {scheduler}.from_pretrained(\"path/to/generator\", subfolder=\"scheduler\")\n"
        "scheduler.set_timesteps(1)  # the schedule is [sigma_init, 0]\n"
        "t, sigma = scheduler.timesteps[0], scheduler.sigmas[0]\n"
        "labels = torch.tensor([0, 1, 2])\n"
        f"x = sigma * torch.randn(3, {c}, {h}, {w}, generator=torch.Generator().manual_seed(0))\n"
        "with torch.no_grad():\n"
        "    out = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample\n"
        "images = scheduler.step(out, t, x).prev_sample  # (3, C, H, W) in [-1, 1]\n")
    return ModelCard(
        title="One-step class-conditional generator (Score Forgetting Distillation)",
        pipeline_tag="unconditional-image-generation",
        summary=("A one-step generator G(z, c) = D(sigma_init z, sigma_init, c) distilled from a class-conditional "
                 "diffusion teacher by SFD, which also makes it forget the classes below. One UNet evaluation "
                 "per image; the scheduler's single step is [sigma_init, 0]. It was distilled for exactly one "
                 "step: more steps would run it at noise levels it was not trained for."),
        usage=(("With sfd_fast (`OneStepPipeline`, a diffusers `DiffusionPipeline`):", with_sfd),
               ("With diffusers alone (the same numbers):", stock)),
        facts={"network": kind, "classes": pipeline.num_classes, "image shape (C, H, W)": [c, h, w],
               "sigma_init": generator.sigma_init, "scheduler": scheduler, "steps (NFE)": 1},
        record=record, tags=(*TAGS, "class-conditional"))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "CheckpointError", "EDMDenoiser", "DDPMDenoiser", "OneStepGenerator", "build_unet",
    "edm_preconditioning", "batch_sigma", "save_denoiser", "load_denoiser", "save_generator", "load_generator", "count_parameters",
]
