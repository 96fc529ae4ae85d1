"""sfd_fast: Score Forgetting Distillation of diffusion models into one-step generators."""

from .core.config import SFDConfig
from .models.unet import UNetConfig
from .core.forget import ForgetSpec
from .io.atomic import CheckpointError
from .models.networks import DDPMDenoiser, EDMDenoiser, OneStepGenerator, load_denoiser, save_denoiser
from .models.unet import build_unet
from .core.state import SFDState
from .core.step import train_step
from .core.step_options import StepOptions

__version__ = "0.1.0"
__all__ = [
    "SFDConfig", "UNetConfig", "ForgetSpec", "SFDState", "train_step", "StepOptions", "EDMDenoiser", "DDPMDenoiser",
    "OneStepGenerator", "build_unet", "load_denoiser", "save_denoiser", "CheckpointError",
]
