"""sfd_fast: Score Forgetting Distillation of diffusion models into one-step generators.

``__all__`` is the public surface (docs/architecture.md lists it); everything else is reached
through its part: ``sfd_fast.core``, ``models``, ``train``, ``eval``, ``baselines``, ``serve``.
"""

from .core.config import SFDConfig
from .core.forget import ForgetSpec
from .core.state import SFDState
from .core.step import train_step
from .core.step_options import StepOptions
from .io.atomic import CheckpointError
from .models.networks import (DDPMDenoiser, EDMDenoiser, OneStepGenerator, load_denoiser, load_generator,
                              save_denoiser, save_generator)
from .models.unet import UNetConfig, build_unet

__version__ = "0.1.0"
__all__ = [
    "SFDConfig", "UNetConfig", "ForgetSpec", "SFDState", "train_step", "StepOptions", "EDMDenoiser", "DDPMDenoiser",
    "OneStepGenerator", "OneStepPipeline", "build_unet", "load_denoiser", "save_denoiser", "load_generator",
    "save_generator", "CheckpointError",
]


def __getattr__(name: str):
    # OneStepPipeline subclasses diffusers' DiffusionPipeline, whose import costs seconds: only on use.
    if name == "OneStepPipeline":
        from .models.one_step_pipeline import OneStepPipeline

        return OneStepPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
