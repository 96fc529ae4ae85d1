"""The CUDA C++ fused losses (``csrc/``): loader, autograd and shape registration, Python API.

Interface relied on by ``sfd_fast.core.dispatch`` and ``bench/bench_kernels.py``:

- ``available() -> (True, "")`` or ``(False, reason)``; never raises, cached after the first call.
- ``sid_generator_loss(x_g, y_real, y_fake, weight, *, alpha, omega_min=1e-5)`` and
  ``edm_denoising_loss(denoised, target, weight)`` -> ``(total, per_sample)``, the same math as
  ``sfd_fast.core.losses`` (see there), autograd-enabled, each one opaque op for torch.compile.

Loading order: the ``sfd_fast._C`` extension that ``setup.py`` built; else a JIT build of
``csrc/`` with ``torch.utils.cpp_extension.load`` (cached under ``$TORCH_EXTENSIONS_DIR``,
disabled by ``SFD_FAST_CUDA_JIT=0``); else ``available()`` says why. Importing this module
never fails and never compiles anything; the first ``available()`` or loss call does.

Rows whose loss is non-finite are left out of ``total`` and get exact zero gradients, as in the
reference; ``weight`` gets no gradient (by design). The backward writes only the gradients
autograd asks for (``ctx.needs_input_grad``): the fake-score step, whose target is detached,
gets dD alone.

Inputs: CUDA tensors of one dtype in {fp32, bf16, fp16} and one memory layout, each sample one
dense block (contiguous or channels_last; see ``_rows_are_dense``); gradients come back with the
inputs' strides. ``weight`` (B,) is cast to fp32. Bad input raises ValueError here (or
RuntimeError from the C++ checks in csrc/loss_checks.h, which say the same).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
JIT_ENV = "SFD_FAST_CUDA_JIT"  # "0": never JIT-compile csrc/ (use the prebuilt sfd_fast._C only)
JIT_NAME = "sfd_fast_C_jit"
# Same flags as setup.py. No --use_fast_math: it buys nothing in a memory-bound kernel and
# approximate division would move the loss off the reference.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> tuple[bool, str]:
    """(True, "") when the fused CUDA losses can run here, else (False, why not)."""
    reason = _load_reason()
    return (reason == "", reason)


_LOAD_REASON: str | None = None  # result of the one load attempt: "" = loaded


# assume_constant_result: under torch.compile the check runs once at trace time and becomes a
# constant, so compiled code (fullgraph too) never traces the loader or graph-breaks on it.
@torch.compiler.assume_constant_result
def _load_reason() -> str:
    global _LOAD_REASON
    if _LOAD_REASON is None:
        _LOAD_REASON = _load()
    return _LOAD_REASON


def sid_generator_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor,
                       weight: torch.Tensor, *, alpha: float,
                       omega_min: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused SiD/SFD generator loss; see ``sfd_fast.core.losses.sid_generator_loss`` for the math.

    x_g, y_real, y_fake: (B, ...) one dtype, one layout; weight: (B,). Returns total () fp32 and
    per_sample (B,) fp32. Gradients flow to x_g, y_real, y_fake (omega is a constant).
    """
    _check_images((x_g, "x_g"), (y_real, "y_real"), (y_fake, "y_fake"))
    weight = _check_weight(weight, x_g)
    _check_devices((x_g, "x_g"), (y_real, "y_real"), (y_fake, "y_fake"), (weight, "weight"))
    _require()
    total, per_sample, _ = torch.ops.sfd_fast_C.sid_loss_fwd(
        x_g, y_real, y_fake, weight, float(alpha), float(omega_min))
    return total, per_sample


def edm_denoising_loss(denoised: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused EDM loss; see ``sfd_fast.core.losses.edm_denoising_loss``.

    denoised, target: (B, ...) one dtype, one layout; weight: (B,). Returns total () and
    per_sample (B,), fp32. Gradients flow to denoised and target (only those that require grad
    are computed).
    """
    _check_images((denoised, "denoised"), (target, "target"))
    weight = _check_weight(weight, denoised)
    _check_devices((denoised, "denoised"), (target, "target"), (weight, "weight"))
    _require()
    return torch.ops.sfd_fast_C.edm_loss_fwd(denoised, target, weight)


# ---- validation (mirrors csrc/loss_checks.h, so errors read the same before any build) ------

def _check_images(*named: tuple[torch.Tensor, str]) -> None:
    ref, ref_name = named[0]
    for t, name in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}; "
                             "they must be equal")
        if t.dim() < 2 or t.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty batch (B, ...) with B >= 1 and at least 2 dims, "
                             f"got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} has no elements per sample (shape {tuple(t.shape)})")
        if t.dtype not in ALLOWED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: {ALLOWED_DTYPES}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                             "all image inputs must share one dtype")
        if not _rows_are_dense(t):
            raise ValueError(f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) does not store each sample "
                             "as one dense block; allowed: contiguous or channels_last layouts "
                             f"({_LAYOUT_FIX})")
        if _layout(t) != _layout(ref):
            raise ValueError(f"{name} has strides {t.stride()} but {ref_name} has {ref.stride()}; all image "
                             f"inputs must share one memory layout ({_LAYOUT_FIX})")


_LAYOUT_FIX = "call .contiguous() or .contiguous(memory_format=torch.channels_last) on all inputs"


def _rows_are_dense(t: torch.Tensor) -> bool:
    """Sample b is the gap-free block [b*N, (b+1)*N) of memory, N = numel/B (csrc/loss_checks.h).

    The kernels address rows as flat memory, so any dense order inside a row works (row sums
    ignore element order); contiguous and channels_last are the common cases, checked first.
    """
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:  # a gap or an overlap
            return False
        expected *= size
    return t.shape[0] == 1 or t.stride(0) == t.numel() // t.shape[0]


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """The strides that matter (a size-1 dim's stride is arbitrary): equal layouts index alike."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def _check_devices(*named: tuple[torch.Tensor, str]) -> None:
    ref, ref_name = named[0]
    for t, name in named:
        if t.device.type != "cuda":
            raise ValueError(f"{name} is on {t.device}; the CUDA kernels need CUDA tensors "
                             "(use the 'torch' or 'triton' backend elsewhere)")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "all inputs must be on one device")


def _check_weight(weight: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.shape != (ref.shape[0],):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a tensor of shape (B,) = ({ref.shape[0]},), got {shape}")
    return weight.to(torch.float32).contiguous()


def _require() -> None:
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the CUDA loss kernels are unavailable: {reason}")


# ---- loading -------------------------------------------------------------------------------

def _load() -> str:
    """Loads the ops (call once, via _load_reason); "" on success, else why they are unavailable."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    try:
        import sfd_fast._C  # noqa: F401  (registers torch.ops.sfd_fast_C on import)
        source = "prebuilt sfd_fast._C"
    except ImportError as err:
        jit_reason = _jit_build()
        if jit_reason:
            return f"no usable prebuilt sfd_fast._C ({err}) and {jit_reason}"
        source = f"JIT build of {CSRC_DIR}"
    try:
        _register_python_side()
    except Exception as err:  # e.g. a second copy of the ops registered under the same name
        return f"registering the ops' fake/autograd functions failed: {type(err).__name__}: {err}"
    try:  # catches an extension built for another GPU architecture ("no kernel image")
        x = torch.zeros(1, 1, device="cuda")
        torch.ops.sfd_fast_C.edm_loss_fwd(x, x, torch.ones(1, device="cuda"))
        torch.cuda.synchronize()
    except RuntimeError as err:
        return f"the extension loaded from {source} cannot run on this GPU: {err}"
    log.info("sfd_fast CUDA loss kernels loaded (%s)", source)
    return ""


def _jit_build() -> str:
    """Compiles and loads csrc/ (cached by torch); "" on success, else why not."""
    if os.environ.get(JIT_ENV, "1") == "0":
        return f"the JIT build is disabled ({JIT_ENV}=0)"
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) was found for a JIT build; set CUDA_HOME"
    sources = sorted(str(p) for p in (*CSRC_DIR.glob("*.cpp"), *CSRC_DIR.glob("*.cu")))
    if not sources:
        return f"no C++/CUDA sources in {CSRC_DIR} (a JIT build needs a source checkout)"
    try:
        load(name=JIT_NAME, sources=sources, extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS)
    except Exception as err:  # compiler errors come as RuntimeError/OSError/CalledProcessError
        return f"build failed: {type(err).__name__}: {str(err)[-2000:]}"
    return ""


# ---- fake (shape) functions and autograd, registered once the ops exist ------------------------

def _fake_sid_fwd(x_g, y_real, y_fake, weight, alpha, omega_min):
    b = x_g.shape[0]
    return (x_g.new_empty((), dtype=torch.float32), x_g.new_empty((b,), dtype=torch.float32),
            x_g.new_empty((b,), dtype=torch.float32))


def _grad_or_empty(like: torch.Tensor, need: bool) -> torch.Tensor:
    """What the C++ backward returns: the gradient with like's strides, or an empty (0,) tensor."""
    return torch.empty_like(like) if need else like.new_empty((0,))


def _fake_sid_bwd(grad_total, grad_per_sample, x_g, y_real, y_fake, weight, per_sample, omega, alpha,
                  need_x_g, need_y_real, need_y_fake):
    return _grad_or_empty(x_g, need_x_g), _grad_or_empty(y_real, need_y_real), _grad_or_empty(y_fake, need_y_fake)


def _fake_edm_fwd(denoised, target, weight):
    return (denoised.new_empty((), dtype=torch.float32),
            denoised.new_empty((denoised.shape[0],), dtype=torch.float32))


def _fake_edm_bwd(grad_total, grad_per_sample, denoised, target, weight, per_sample, need_denoised,
                  need_target):
    return _grad_or_empty(denoised, need_denoised), _grad_or_empty(target, need_target)


def _upstream(grad_total, grad_per_sample, like: torch.Tensor):
    """Upstream grads as the kernels take them: 0-d fp32 total, (B,) fp32 or None."""
    if grad_total is None:
        grad_total = like.new_zeros((), dtype=torch.float32)
    grad_total = grad_total.to(torch.float32).contiguous()
    if grad_per_sample is not None:
        grad_per_sample = grad_per_sample.to(torch.float32).contiguous()
    return grad_total, grad_per_sample


def _sid_setup_context(ctx, inputs, output):
    x_g, y_real, y_fake, weight, alpha, _omega_min = inputs
    _total, per_sample, omega = output
    ctx.save_for_backward(x_g, y_real, y_fake, weight, per_sample, omega)
    ctx.alpha = alpha


def _sid_backward(ctx, grad_total, grad_per_sample, _grad_omega):
    x_g, y_real, y_fake, weight, per_sample, omega = ctx.saved_tensors
    grad_total, grad_per_sample = _upstream(grad_total, grad_per_sample, x_g)
    need = tuple(bool(n) for n in ctx.needs_input_grad[:3])
    grads = torch.ops.sfd_fast_C.sid_loss_bwd(grad_total, grad_per_sample, x_g, y_real, y_fake,
                                              weight, per_sample, omega, ctx.alpha, *need)
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None)


def _edm_setup_context(ctx, inputs, output):
    denoised, target, weight = inputs
    ctx.save_for_backward(denoised, target, weight, output[1])


def _edm_backward(ctx, grad_total, grad_per_sample):
    denoised, target, weight, per_sample = ctx.saved_tensors
    grad_total, grad_per_sample = _upstream(grad_total, grad_per_sample, denoised)
    need = tuple(bool(n) for n in ctx.needs_input_grad[:2])  # the fake-score step: (True, False)
    grads = torch.ops.sfd_fast_C.edm_loss_bwd(grad_total, grad_per_sample, denoised, target,
                                              weight, per_sample, *need)
    return (*(g if n else None for g, n in zip(grads, need)), None)


def _register_python_side() -> None:
    """Called once by _load(), from this module (csrc/bindings.cpp names it as the pystub)."""
    torch.library.register_fake("sfd_fast_C::sid_loss_fwd", _fake_sid_fwd)
    torch.library.register_fake("sfd_fast_C::sid_loss_bwd", _fake_sid_bwd)
    torch.library.register_fake("sfd_fast_C::edm_loss_fwd", _fake_edm_fwd)
    torch.library.register_fake("sfd_fast_C::edm_loss_bwd", _fake_edm_bwd)
    torch.library.register_autograd("sfd_fast_C::sid_loss_fwd", _sid_backward,
                                    setup_context=_sid_setup_context)
    torch.library.register_autograd("sfd_fast_C::edm_loss_fwd", _edm_backward,
                                    setup_context=_edm_setup_context)


__all__ = ["available", "sid_generator_loss", "edm_denoising_loss", "CSRC_DIR", "NVCC_FLAGS"]
