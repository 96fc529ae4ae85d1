"""One-step generators as diffusers pipelines: the scheduler that makes one step land on sigma_init.

A distilled generator is G(z, c) = D(sigma_init z, sigma_init, c): one denoiser call at the fixed
noise level sigma_init. A diffusers pipeline reproduces it when its scheduler, asked for one
step, (1) starts from noise scaled by sigma_init, (2) feeds the UNet the same input scaling and
timestep as our denoiser, and (3) turns the UNet output into x0 and steps straight to sigma 0.

- DDPM-trained UNets (``DDPMDenoiser``, the latent ``LatentDenoiser``): ``EulerDiscreteScheduler``
  with Karras sigmas capped at ``sigma_max = sigma_init``. For one step the Karras ramp is the
  single point 0, so the schedule is exactly [sigma_init, 0]; the timestep is sigma_init's
  fractional position in the training table (``_sigma_to_t``, the interpolation our denoisers use);
  ``scale_model_input`` divides by sqrt(1 + sigma^2) (= sqrt(abar)); ``step`` forms x0 from
  epsilon / v / sample prediction as we do and Euler-steps to 0, landing on x0. ``init_noise_sigma``
  is the largest sigma of the schedule (``timestep_spacing="trailing"``), i.e. sigma_init, so the
  stock ``StableDiffusionPipeline`` needs nothing but ``num_inference_steps=1``. Config alone
  cannot do this without Karras sigmas: "trailing" puts one step at t=999, "linspace" at t=0 and
  "leading" at ``steps_offset`` (a whole timestep, not sigma_init = 2.5 at t ~ 624.8, and with
  ``init_noise_sigma`` = sqrt(1 + sigma^2) instead of sigma).
- EDM-preconditioned UNets (``EDMDenoiser``): ``EDMEulerScheduler`` with ``sigma_max = sigma_init``:
  c_in, c_noise = log(sigma) / 4 and c_skip / c_out are EDM's (its ``prediction_type="epsilon"``
  is EDM's F-prediction). Its ``init_noise_sigma`` is sqrt(1 + sigma_max^2), so ``OneStepPipeline``
  scales the noise by the schedule's first sigma instead (equal to ``init_noise_sigma`` for Euler).

``OneStepPipeline`` (components ``unet``, ``scheduler``) is the class-label pipeline: a
``DiffusionPipeline`` with ``save_pretrained`` / ``from_pretrained`` and ``model_index.json``, called
like ``DDPMPipeline`` with class labels. Text-to-image generators need no class of ours: their folder
is a ``StableDiffusionPipeline`` with the Euler scheduler above.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler, EulerDiscreteScheduler, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .unet import unet_image_shape

# The keys of a DDPM-family scheduler config that define the training noise table and what the
# UNet predicts; everything else (spacing, offsets, clipping) is about a sampler, not the model.
TRAINING_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                          "prediction_type", "rescale_betas_zero_snr")
EDM_SIGMA_MIN = 0.002  # EDM's sigma_min; only used by multi-step schedules, never by the one step
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
ONE_STEP_SCHEDULERS = {"EulerDiscreteScheduler": EulerDiscreteScheduler, "EDMEulerScheduler": EDMEulerScheduler}


def training_schedule(scheduler_config: dict) -> dict:
    """The training-table part of a DDPM-family scheduler config (see ``TRAINING_SCHEDULE_KEYS``)."""
    return {k: scheduler_config[k] for k in TRAINING_SCHEDULE_KEYS if k in scheduler_config}


def one_step_euler_scheduler(scheduler_config: dict, sigma_init: float) -> EulerDiscreteScheduler:
    """EulerDiscreteScheduler on the teacher's training table whose one step is [sigma_init, 0]."""
    scheduler = EulerDiscreteScheduler.from_config(
        training_schedule(scheduler_config), use_karras_sigmas=True, use_exponential_sigmas=False,
        use_beta_sigmas=False, sigma_max=float(sigma_init), sigma_min=None, timestep_spacing="trailing",
        timestep_type="discrete", interpolation_type="linear", final_sigmas_type="zero",
        steps_offset=1)  # unused by these sigmas; StableDiffusionPipeline rewrites any other value with a warning
    table = ((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt()
    if not float(table[0]) <= sigma_init <= float(table[-1]):
        raise ValueError(f"sigma_init={sigma_init} is outside the training schedule's noise range "
                         f"[{float(table[0]):.4g}, {float(table[-1]):.4g}]; no timestep of the UNet reaches it")
    return scheduler


def one_step_edm_scheduler(sigma_init: float, sigma_data: float) -> EDMEulerScheduler:
    """EDMEulerScheduler whose one step is [sigma_init, 0] with EDM's preconditioning at sigma_data."""
    return EDMEulerScheduler(sigma_min=min(EDM_SIGMA_MIN, float(sigma_init)), sigma_max=float(sigma_init),
                             sigma_data=float(sigma_data), sigma_schedule="karras", prediction_type="epsilon",
                             rho=7.0, final_sigmas_type="zero")


def one_step_sigma(scheduler) -> float:
    """The noise level a scheduler's single step starts from (sets it to one step)."""
    scheduler.set_timesteps(1)
    return float(scheduler.sigmas[0])


class OneStepPipeline(DiffusionPipeline):
    """A distilled class-conditional one-step generator as a diffusers pipeline.

    Components: ``unet`` (a class-conditional ``UNet2DModel``) and ``scheduler`` (one of
    ``ONE_STEP_SCHEDULERS``, built by ``one_step_euler_scheduler`` / ``one_step_edm_scheduler``).
    ``pipe(class_labels, generator=...)`` returns images like ``DDPMPipeline``: PIL images by
    default, or (B, H, W, C) numpy / (B, C, H, W) torch in [0, 1]; ``output_type="latent"`` gives the
    generator's raw output x0 (B, C, H, W), nominally in [-1, 1], unclamped.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        if getattr(unet.config, "num_class_embeds", None) is None:
            raise ValueError("OneStepPipeline needs a class-conditional UNet (num_class_embeds is not set); "
                             "text-to-image generators are StableDiffusionPipeline folders")
        if type(scheduler).__name__ not in ONE_STEP_SCHEDULERS:
            raise ValueError(f"OneStepPipeline needs one of {sorted(ONE_STEP_SCHEDULERS)} as its scheduler, "
                             f"got {type(scheduler).__name__}")
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained`` that reads safetensors only (never unpickles weights)."""
        from diffusers.utils import is_accelerate_available

        kwargs.setdefault("use_safetensors", True)
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())  # without accelerate: a notice per model
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return unet_image_shape(self.unet)

    @property
    def sigma_init(self) -> float:
        return float(self.scheduler.config.sigma_max)

    def _labels(self, class_labels) -> torch.Tensor:
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels)
        if labels.dim() != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be an int or a non-empty 1-d sequence of ints, got {class_labels!r}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"class label(s) {bad.tolist()} out of range: this generator has classes "
                             f"0..{self.num_classes - 1}")
        return labels.long().to(self.device)

    @torch.no_grad()
    def __call__(self, class_labels, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        """One network evaluation per image.

        class_labels: int or (B,) ints. latents: optional unit-variance noise z (B, C, H, W); drawn
        from ``generator`` otherwise (``torch.randn`` order, as ``DDPMPipeline`` draws it).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}")
        labels = self._labels(class_labels)
        shape = (labels.shape[0], *self.image_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (one per class label), got {tuple(latents.shape)}")
        self.scheduler.set_timesteps(1, device=self.device)
        t = self.scheduler.timesteps[0]
        x = latents.to(self.device, torch.float32) * self.scheduler.sigmas[0].to(self.device)
        model_input = self.scheduler.scale_model_input(x, t)
        out = self.unet(model_input.to(self.unet.dtype), t, class_labels=labels).sample
        x0 = self.scheduler.step(out.float(), t, x).prev_sample
        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = x0
        else:
            images = (x0 / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


__all__ = ["OneStepPipeline", "one_step_euler_scheduler", "one_step_edm_scheduler", "one_step_sigma",
           "training_schedule", "TRAINING_SCHEDULE_KEYS", "ONE_STEP_SCHEDULERS", "OUTPUT_TYPES"]
