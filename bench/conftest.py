"""Shared pytest-benchmark setup: every saved result records device, driver, clocks, versions, commit and date.

Run a suite:  python -m pytest bench/bench_<thing>.py --benchmark-enable --benchmark-json=OUT.json
pytest-benchmark already stores machine_info (CPU, Python) and commit_info (git id, dirty flag);
the hook below adds what our numbers depend on (bench/_environment.py): GPU name, compute
capability, NVIDIA driver version, SM and memory clocks, CUDA runtime, torch / Triton /
diffusers / onnxruntime / TensorRT versions, torch's thread count, commit and date.

``SFD_BENCH_QUICK=1`` asks every suite for its reduced sizes and round counts (what
bench/gpu_check.sh runs; ``_timing.quick()``); each suite's docstring says what it reduces.
"""

from __future__ import annotations

import pytest

from _environment import environment


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["sfd_fast_environment"] = environment()


@pytest.fixture(scope="session")
def bench_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
