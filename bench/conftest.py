"""Shared pytest-benchmark setup: every saved result records device, versions, commit and date.

Run a suite:  python -m pytest bench/bench_<thing>.py --benchmark-enable --benchmark-json=OUT.json
pytest-benchmark already stores machine_info (CPU, Python) and commit_info (git id, dirty flag);
the hook below adds the accelerator and library versions that our numbers depend on.
"""

from __future__ import annotations

import datetime
import platform

import pytest


def environment() -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["driver"] = ".".join(map(str, torch.cuda.get_device_capability())) + " (compute capability)"
    for name in ("triton", "diffusers", "onnxruntime", "tensorrt"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # not installed, or a stub without libraries
            info[name] = None
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["sfd_fast_environment"] = environment()


@pytest.fixture(scope="session")
def bench_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
