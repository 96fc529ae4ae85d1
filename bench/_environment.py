"""The environment a benchmark number depends on, as one JSON-friendly dict.

Used by bench/conftest.py (stored in every pytest-benchmark JSON as
``machine_info.sfd_fast_environment``) and by bench/gpu_check.py (the header of its report).

GPU facts come from three places, each optional, and every field says where it came from when
it could not be read:
- torch: device name, compute capability, SM count, L2 size, memory, CUDA runtime version;
- NVML (``pynvml``, the ``nvidia-ml-py`` wheel) or else ``nvidia-smi``: the NVIDIA driver
  version and the SM / memory clocks (current and maximum) at the time of the run, so that a
  number taken at a throttled or locked clock can be recognised later;
- git: commit id and whether the tree had uncommitted changes.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys

from sfd_fast.io.provenance import git_commit

# key -> distribution names that provide it (installed versions are read from package metadata,
# without importing: transformers alone takes seconds, and a TensorRT stub may not import at all)
LIBRARIES = {"triton": ("triton",), "diffusers": ("diffusers",), "transformers": ("transformers",),
             "onnx": ("onnx",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "tensorrt": ("tensorrt",),
             "numpy": ("numpy",), "pytest_benchmark": ("pytest-benchmark",)}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET",
                    "SFD_FAST_BACKEND", "TORCH_CUDA_ARCH_LIST")


def _version(distributions: tuple[str, ...]) -> str | None:
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name) + ("" if name == distributions[0] else f" ({name})")
        except metadata.PackageNotFoundError:
            continue
    return None


def _nvml(index: int) -> dict:
    import pynvml  # the nvidia-ml-py wheel

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        clock = pynvml.nvmlDeviceGetClockInfo
        max_clock = pynvml.nvmlDeviceGetMaxClockInfo
        driver = pynvml.nvmlSystemGetDriverVersion()
        info = {
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "clocks_sm_mhz": clock(h, pynvml.NVML_CLOCK_SM),
            "clocks_mem_mhz": clock(h, pynvml.NVML_CLOCK_MEM),
            "clocks_max_sm_mhz": max_clock(h, pynvml.NVML_CLOCK_SM),
            "clocks_max_mem_mhz": max_clock(h, pynvml.NVML_CLOCK_MEM),
            "source": "pynvml",
        }
        try:
            info["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000
        except pynvml.NVMLError:
            pass
        return info
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi(index: int) -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("nvidia-smi is not on PATH")
    fields = ["driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.limit"]
    out = subprocess.run([exe, f"--id={index}", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
    values = [v.strip() for v in out.split(",")]

    def number(v: str):
        try:
            return float(v) if "." in v else int(v)
        except ValueError:
            return None  # "[N/A]"
    keys = ["driver", "clocks_sm_mhz", "clocks_mem_mhz", "clocks_max_sm_mhz", "clocks_max_mem_mhz", "power_limit_w"]
    info = {k: (v if k == "driver" else number(v)) for k, v in zip(keys, values)}
    info["source"] = "nvidia-smi"
    return info


def _physical_index(index: int) -> int:
    """NVML / nvidia-smi index of torch's device ``index`` (they ignore CUDA_VISIBLE_DEVICES)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index  # unset, or UUIDs: assume the order is the physical one


def gpu_driver_and_clocks(index: int = 0) -> dict:
    """NVIDIA driver version and clocks from NVML, else nvidia-smi; {"error": ...} when neither works."""
    index = _physical_index(index)
    errors = []
    for reader in (_nvml, _nvidia_smi):
        try:
            return reader(index)
        except Exception as exc:
            errors.append(f"{reader.__name__.lstrip('_')}: {type(exc).__name__}: {exc}")
    return {"driver": None, "error": "; ".join(errors)}


def environment() -> dict:
    """Device, driver, clocks, versions, threads, commit and date of this run."""
    import torch

    info: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),  # intra-op threads every CPU number ran with
        "cuda_runtime": torch.version.cuda,  # the CUDA version torch was built against (None: CPU build)
        "env": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
    }
    for key, distributions in LIBRARIES.items():
        info[key] = _version(distributions)
    if info["onnxruntime"] is not None:  # onnxruntime-gpu lists CUDAExecutionProvider
        try:
            import onnxruntime

            info["onnxruntime_providers"] = onnxruntime.get_available_providers()
        except Exception as exc:  # installed but broken
            info["onnxruntime_providers"] = f"import failed: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        info["device"] = f"cpu ({info['cpu']})"
        info["device_type"] = "cpu"
        return info
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    info.update({
        "device": props.name,
        "device_type": "cuda",
        "device_count": torch.cuda.device_count(),
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "l2_cache_bytes": getattr(props, "L2_cache_size", None),
        "memory_bytes": props.total_memory,
        "cudnn": torch.backends.cudnn.version(),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
    })
    get_driver_api = getattr(torch._C, "_cuda_getDriverVersion", None)  # e.g. 12080: newest CUDA the driver runs
    if get_driver_api is not None:
        try:
            info["cuda_driver_api"] = get_driver_api()
        except Exception:
            pass
    nv = gpu_driver_and_clocks(index)
    info["driver"] = nv.pop("driver", None)
    info["driver_source"] = nv.pop("source", None)
    info.update(nv)
    return info


def device_slug(info: dict) -> str:
    """'nvidia-h100-80gb-hbm3', 'cpu': a file-name-safe name of the device in ``info``."""
    if info.get("device_type") != "cuda":
        return "cpu"
    keep = "".join(c.lower() if c.isalnum() else "-" for c in info["device"])
    return "-".join(part for part in keep.split("-") if part)


if __name__ == "__main__":
    import json

    print(json.dumps(environment(), indent=2))
