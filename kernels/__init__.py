"""Triton kernels of sfd_fast (installed as sfd_fast.kernels).

Each fused loss is a ``torch.library`` custom op (forward and backward) with the plain-PyTorch
reference it must match in ``sfd_fast.core.losses``. Importing this package needs triton; CPU
tensors run only when TRITON_INTERPRET=1 was set before the import (see docs/kernels.md).
"""

if __name__ != "sfd_fast.kernels":
    # This directory is the subpackage sfd_fast.kernels (package-dir in pyproject.toml). With the
    # repository root on sys.path (``python -m pytest`` or ``python -m ...`` run from the root) it is
    # also importable as a top-level ``kernels``, and transformers imports exactly that name to probe
    # for the Hugging Face ``kernels`` package. Running the modules a second time would register every
    # sfd_fast:: custom op again: torch destroys the first registration, and the ops already bound in
    # sfd_fast.kernels keep handles to the freed dispatcher entry (a use-after-free: rare
    # ``ValueError: vector::reserve`` or segfaults on their first call). Under any other name this
    # package is empty and has no submodules.
    __path__ = []
    __all__ = []
else:
    from ._common import INTERPRETED
    from .edm_loss import edm_denoising_loss, edm_precond_denoising_loss
    from .sid_loss import sid_generator_loss

    __all__ = ["INTERPRETED", "edm_denoising_loss", "edm_precond_denoising_loss", "sid_generator_loss"]
