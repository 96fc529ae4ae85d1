"""Build hook: compiles csrc/ into sfd_fast._C when a CUDA toolchain and a CUDA torch exist.

Everything else (metadata, packages) lives in pyproject.toml. Environment switches:
  SFD_FAST_SKIP_CUDA_BUILD=1      never build the extension (pure-Python install)
  TORCH_CUDA_ARCH_LIST="9.0"      target architectures (torch's own variable)
Without a CUDA build the package still works; the "cuda" backend then JIT-compiles csrc/ on
first use (torch.utils.cpp_extension.load) or reports why it cannot.
"""

import glob
import os
import sys

from setuptools import setup


def cuda_extension():
    if os.environ.get("SFD_FAST_SKIP_CUDA_BUILD") == "1":
        return None, "SFD_FAST_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return None, "no CUDA toolkit found (set CUDA_HOME)"
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return None, "csrc/ holds no sources"
    ext = CUDAExtension(
        name="sfd_fast._C",
        sources=sources,
        # Same nvcc flags as the JIT build in sfd_fast/core/cuda_ext.py. No --use_fast_math: the loss
        # kernels are memory-bound, and approximate division would move them off the reference.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
    )
    return (ext, BuildExtension), None


built, reason = cuda_extension()
if built is None:
    print(f"sfd_fast: installing without the CUDA extension ({reason})", file=sys.stderr)
    setup()
else:
    ext, build_ext = built
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
