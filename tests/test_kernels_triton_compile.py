"""The Triton kernels compile to GPU code (cubin) with Triton's real compiler, no GPU needed.

The interpreter tests (test_kernels_triton.py) never run Triton's compiler; this catches what
only it rejects (types in constexpr branches, unsupported builtins). Runs in a subprocess
because TRITON_INTERPRET is read when the kernels are decorated, and with a fresh cache dir so
the kernels are really compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install sfd_fast[triton])")
SCRIPT = Path(__file__).with_name("_compile_triton_kernels.py")


def compile_all(tmp_path, arch: str, dtypes: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), arch, *dtypes], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_kernels_compile_for_sm90_bf16(tmp_path):
    out = compile_all(tmp_path, "90", ["bf16"])
    assert out.count("ok ") == 9, out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernels_compile_all_dtypes(tmp_path, arch):
    out = compile_all(tmp_path, arch, ["fp32", "bf16", "fp16"])
    assert out.count("ok ") == 23, out
