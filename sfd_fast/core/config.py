"""The SFD hyperparameters (SPEC sections 2-3) as a validated dataclass, with named presets.

Every field carries its default from the reference method and a one-line reason. Configs are
plain data: they validate themselves, round-trip through JSON, and the CLI only builds them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _number(name: str, value: Any, kind: str) -> Any:
    """``value`` as the field's type ("int", "float", "float | None"), or a ValueError naming it.

    JSON and ``--set`` hand in anything: 1.5 or "abc" for an int, null, NaN or Infinity for a
    float would otherwise train silently into a NaN model (issue 19).
    """
    optional = kind.endswith("| None")
    if value is None and optional:
        return None
    wanted = "an integer" if kind == "int" else "a finite number" + (" or null" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be {wanted}, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SFDConfig:
    """Every hyperparameter of one SFD run (SPEC sections 2-3), with the reference defaults."""

    # --- what to forget -------------------------------------------------------------
    forget_classes: tuple[int, ...] = (0,)  # classes whose generations are pushed away
    override_classes: tuple[int, ...] | None = (1,)  # safe target per forget class; None = random remaining class per sample
    # --- batch ----------------------------------------------------------------------
    batch_size: int = 64                    # remain-class samples per step
    forget_batch_size: int = 16             # forget-class samples per step
    # --- generator --------------------------------------------------------------------
    sigma_init: float = 2.5                 # G(z, c) = D(sigma_init * z, sigma_init, c)
    # --- EDM noise for the fake-score step ----------------------------------------------
    p_mean: float = -1.2                    # log-normal sigma: mean of ln(sigma)
    p_std: float = 1.2                      # log-normal sigma: std of ln(sigma)
    sigma_data: float = 0.5                 # data std for EDM preconditioning and loss weight
    # --- SiD noise for the generator step -----------------------------------------------
    t_max: float = 800.0                    # t ~ U(0, t_max / 1000) on the EDM (rho) schedule
    sigma_min: float = 0.002                # EDM schedule lower end
    sigma_max: float = 80.0                 # EDM schedule upper end
    rho: float = 7.0                        # EDM schedule curvature
    alpha: float = 1.2                      # SiD loss mixing coefficient
    omega_min: float = 1e-5                 # lower clip of the per-sample normaliser omega
    # --- SFD weights ----------------------------------------------------------------
    lambda_sg: float = 0.01                 # weight of the forget-class EDM loss (fake-score step)
    lambda_g: float = 0.01                  # weight of the forget (score-based MU) term (generator step)
    # --- loss scales (reference code: sum over batch * scale / batch size) --------------
    fake_loss_scale: float = 1.0            # fake-score loss multiplier
    gen_loss_scale: float = 100.0           # generator loss multiplier
    # --- optimisation ---------------------------------------------------------------
    lr_gen: float = 1e-5                    # Adam lr for G (CIFAR-10 scale reference)
    lr_fake: float = 1e-5                   # Adam lr for the fake score
    adam_betas: tuple[float, float] = (0.0, 0.999)  # SiD uses no first-moment momentum
    adam_eps: float = 1e-8                  # 1e-6 is the reference value for fp16 training
    grad_clip_value: float | None = 1.0     # clip G's gradients by value (SFD); None disables
    # --- EMA of G -------------------------------------------------------------------
    ema_halflife_kimg: float = 0.5          # EMA half-life in thousands of generated images
    ema_rampup_ratio: float | None = 0.05   # half-life <= ratio * images seen so far
    # --- reproducibility --------------------------------------------------------------
    seed: int = 0                           # seeds the state's own torch.Generator
    # --- fault handling (sfd_fast.core.faults) ----------------------------------------------
    nonfinite_policy: str = "skip"          # non-finite loss/grad: "skip" the update (counted), "raise", or "sanitize" (reference code: nan_to_num grads, step anyway)
    max_consecutive_nonfinite: int = 50     # stop the run after this many skipped updates in a row; 0 = never

    def __post_init__(self) -> None:
        # JSON and CLI hand in lists; keep tuples so the config stays hashable.
        object.__setattr__(self, "forget_classes", tuple(int(c) for c in self.forget_classes))
        if self.override_classes is not None:
            object.__setattr__(self, "override_classes", tuple(int(c) for c in self.override_classes))
        for f in dataclasses.fields(self):
            if f.type in ("int", "float", "float | None"):
                object.__setattr__(self, f.name, _number(f.name, getattr(self, f.name), f.type))
        _check(isinstance(self.adam_betas, (tuple, list)) and len(self.adam_betas) == 2,
               f"adam_betas must be two numbers [beta1, beta2], got {self.adam_betas!r}")
        object.__setattr__(self, "adam_betas", tuple(_number("adam_betas", b, "float") for b in self.adam_betas))
        _check(len(self.forget_classes) >= 1, "forget_classes is empty; give at least one class to forget")
        _check(len(set(self.forget_classes)) == len(self.forget_classes),
               f"forget_classes {self.forget_classes} contains duplicates")
        if self.override_classes is not None:
            _check(len(self.override_classes) == len(self.forget_classes),
                   f"override_classes {self.override_classes} must have one entry per forget class "
                   f"{self.forget_classes}, or be None for a random remaining class")
        for name in ("batch_size", "forget_batch_size"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sigma_init", "sigma_data", "sigma_min", "sigma_max", "rho", "p_std",
                     "lr_gen", "lr_fake", "omega_min", "ema_halflife_kimg", "adam_eps"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lambda_sg", "lambda_g", "fake_loss_scale", "gen_loss_scale"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.sigma_min < self.sigma_max,
               f"sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max}")
        _check(0 < self.t_max <= 1000, f"t_max must be in (0, 1000], got {self.t_max}")
        _check(all(0 <= b < 1 for b in self.adam_betas), f"adam_betas must be in [0, 1), got {self.adam_betas}")
        _check(self.nonfinite_policy in ("skip", "raise", "sanitize"),
               f"nonfinite_policy must be 'skip', 'raise' or 'sanitize', got {self.nonfinite_policy!r}")
        _check(self.max_consecutive_nonfinite >= 0,
               f"max_consecutive_nonfinite must be >= 0 (0 = never stop), got {self.max_consecutive_nonfinite}")
        if self.grad_clip_value is not None:
            _check(self.grad_clip_value > 0, f"grad_clip_value must be > 0 or None, got {self.grad_clip_value}")
        if self.ema_rampup_ratio is not None:
            _check(self.ema_rampup_ratio > 0, f"ema_rampup_ratio must be > 0 or None, got {self.ema_rampup_ratio}")

    def replace(self, **changes: Any) -> "SFDConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SFDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"unknown SFDConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str) -> "SFDConfig":
        try:
            return SFD_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown SFD preset {name!r}; known: {sorted(SFD_PRESETS)}") from None


SFD_PRESETS: dict[str, SFDConfig] = {
    # The reference label-conditional (CIFAR-10) setting of the SFD paper.
    "reference": SFDConfig(),
    # The embedded CPU demo (16x16 digits, ~1M-parameter UNet). Measured here: with lr 3e-4 and
    # lambda 1 the forget class is overridden within 50 steps while remain accuracy rises above
    # the initial one-step generator's; lr 1e-4 is slower for the same budget (see README).
    "demo": SFDConfig(batch_size=32, forget_batch_size=16, lr_gen=3e-4, lr_fake=3e-4,
                      lambda_sg=1.0, lambda_g=1.0),
}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr_gen=1e-4", "override_classes=null"]`` -> ``{"lr_gen": 0.0001, "override_classes": None}``.

    Values are JSON; the CLI's repeatable ``--set FIELD=VALUE`` goes through here.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--set {key}: value {value!r} is not JSON (numbers as 1e-4, strings quoted, "
                             "lists as [0,1], null for None)") from None
    return out


def field_docs(cls: type) -> dict[str, str]:
    """One-line comment of each dataclass field, read from the source (used by ``--help``)."""
    import inspect

    docs: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith("#"):
            name = stripped.split(":", 1)[0].strip()
            if name.isidentifier():
                docs[name] = stripped.split("#", 1)[1].strip()
    return docs


__all__ = ["SFDConfig", "SFD_PRESETS", "parse_overrides", "field_docs"]
