"""sfd_fast: Score Forgetting Distillation of diffusion models into one-step generators."""

from .config import SFDConfig, UNetConfig
from .forget import ForgetSpec
from .networks import (CheckpointError, DDPMDenoiser, EDMDenoiser, OneStepGenerator, build_unet,
                       load_denoiser, save_denoiser)
from .state import SFDState
from .step import train_step
from .step_options import StepOptions

__version__ = "0.1.0"
__all__ = [
    "SFDConfig", "UNetConfig", "ForgetSpec", "SFDState", "train_step", "StepOptions", "EDMDenoiser", "DDPMDenoiser",
    "OneStepGenerator", "build_unet", "load_denoiser", "save_denoiser", "CheckpointError",
]
