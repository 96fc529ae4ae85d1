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
    # ``ValueError: vector::reserve`` or segfaults on their first call). So under any other name
    # this package runs none of its modules: it hands the name to the real Hugging Face package
    # when one is installed further down sys.path (transformers >= 5.25 depends on it and imports
    # it), and is otherwise empty.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    _rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _rest)
    if _spec is None:
        __path__ = []
        __all__ = []
    else:
        # The import system returns whatever sys.modules holds once this file has run.
        _real = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _real
        _spec.loader.exec_module(_real)
else:
    from ._common import INTERPRETED
    from .edm_loss import edm_denoising_loss, edm_precond_denoising_loss
    from .sid_loss import sid_generator_loss

    __all__ = ["INTERPRETED", "edm_denoising_loss", "edm_precond_denoising_loss", "sid_generator_loss"]
