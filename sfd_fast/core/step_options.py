"""StepOptions: how ``train_step`` runs one SFD iteration (never *what* it computes).

The reference eager path (``StepOptions()`` / ``options=None``) stays the default. Every other
choice here changes speed, memory or floating-point rounding, except ``share_noise``, which
changes the *sampling* (one z for both sub-steps; see docs/fast_step.md) and is off by default.

Tri-state features ("off" | "auto" | "on"): "auto" uses the feature when this device and build
allow it and otherwise falls back with one logged reason; "on" raises when it is impossible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .dispatch import BACKENDS

PRECISIONS = ("fp32", "bf16")
TRISTATE = ("off", "auto", "on")
ATTENTION = ("sdpa", "xformers", "auto")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class StepOptions:
    """Execution options of ``train_step(state, options=...)``; hashable, JSON-friendly."""

    fused: bool = False              # False: the reference eager path of step.py; True: fast_step.py
    precision: str = "fp32"          # "bf16": autocast of the UNets; master weights and loss math stay fp32
    channels_last: bool = False      # NHWC UNet weights and inputs (tensor-core friendly convs)
    backend: str = "auto"            # loss implementation via sfd_fast.core.dispatch ("auto"|"torch"|"triton"|"cuda")
    attention: str = "sdpa"          # diffusers attention processor: PyTorch SDPA, or xformers when installed
    compile: str = "off"             # torch.compile the networks' forwards and the losses
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" = quick CPU check of the graph)
    cuda_graph: str = "off"          # capture the whole step in one CUDA graph (CUDA only)
    share_noise: bool = False        # one z for the fake-score and generator steps (a change of sampling)
    reuse_generator_sample: bool = True  # with share_noise: evaluate G(z) once and reuse it (exact)
    accumulation_rounds: int = 1     # micro-batches per optimizer step (divides both batch sizes)
    warmup_steps: int = 2            # eager steps (on a side stream) before CUDA-graph capture

    def __post_init__(self) -> None:
        choices = {"precision": PRECISIONS, "backend": BACKENDS, "attention": ATTENTION,
                   "compile": TRISTATE, "cuda_graph": TRISTATE,
                   "compile_backend": COMPILE_BACKENDS}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"StepOptions.{name}={value!r} is not allowed; choose one of {allowed}")
        for name in ("fused", "channels_last", "share_noise", "reuse_generator_sample"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"StepOptions.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.accumulation_rounds, int) or self.accumulation_rounds < 1:
            raise ValueError(f"StepOptions.accumulation_rounds must be an int >= 1, got {self.accumulation_rounds!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(f"StepOptions.warmup_steps must be an int >= 1, got {self.warmup_steps!r}")
        if not self.fused:
            fast_only = {"precision": "fp32", "channels_last": False, "attention": "sdpa", "compile": "off",
                         "cuda_graph": "off", "accumulation_rounds": 1}
            wrong = {k: getattr(self, k) for k, v in fast_only.items() if getattr(self, k) != v}
            if wrong:
                raise ValueError(f"StepOptions {wrong} need the fused path; set fused=True "
                                 "(the reference path only takes backend and share_noise)")

    @property
    def is_reference(self) -> bool:
        return not self.fused

    def replace(self, **changes: Any) -> "StepOptions":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StepOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown StepOptions fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str) -> "StepOptions":
        try:
            return STEP_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown StepOptions preset {name!r}; known: {sorted(STEP_PRESETS)}") from None


STEP_PRESETS: dict[str, StepOptions] = {
    # The reference eager fp32 step of step.py (the default everywhere).
    "reference": StepOptions(),
    # Fused path, fp32, eager: same math and sampling as "reference" (tested equal).
    "fused": StepOptions(fused=True),
    # Fused path in bf16 autocast, eager: the "eager bf16" row of the benchmark.
    "bf16": StepOptions(fused=True, precision="bf16"),
    # Everything the device allows; falls back feature by feature with a logged reason.
    "fast": StepOptions(fused=True, precision="bf16", channels_last=True, attention="auto", compile="auto",
                        cuda_graph="auto", share_noise=True),
}

__all__ = ["StepOptions", "STEP_PRESETS", "PRECISIONS", "TRISTATE"]
