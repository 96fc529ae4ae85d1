"""Triton kernels of sfd_fast (installed as sfd_fast.kernels).

Each fused loss is a ``torch.library`` custom op (forward and backward) with the plain-PyTorch
reference it must match in ``sfd_fast.core.losses``. Importing this package needs triton; CPU
tensors run only when TRITON_INTERPRET=1 was set before the import (see docs/kernels.md).
"""

from ._common import INTERPRETED
from .edm_loss import edm_denoising_loss, edm_precond_denoising_loss
from .sid_loss import sid_generator_loss

__all__ = ["INTERPRETED", "edm_denoising_loss", "edm_precond_denoising_loss", "sid_generator_loss"]
