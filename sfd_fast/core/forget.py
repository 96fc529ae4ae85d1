"""Which classes are forgotten and what replaces them: validated once, sampled without syncs."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=64)
def _label_table(labels: tuple[int, ...], device: str) -> torch.Tensor:
    """Class lists as device tensors, made once: no host-to-device copy inside the step."""
    return torch.tensor(labels, device=device)


@dataclass(frozen=True)
class ForgetSpec:
    """Forget classes c_f, their override ("safe") classes c_o, and the remaining classes c_r.

    ``override=None`` draws c_o uniformly from the remaining classes for every sample;
    otherwise ``override[i]`` is the fixed override of ``forget[i]``.
    """

    num_classes: int
    forget: tuple[int, ...]
    override: tuple[int, ...] | None

    def __post_init__(self) -> None:
        allowed = f"allowed: 0..{self.num_classes - 1}"
        for c in self.forget:
            if not 0 <= c < self.num_classes:
                raise ValueError(f"forget class {c} is out of range for a {self.num_classes}-class model; {allowed}")
        if not self.remain:
            raise ValueError(f"every class is forgotten (forget={list(self.forget)} of {self.num_classes}); "
                             "at least one class must remain")
        if self.override is not None:
            if len(self.override) != len(self.forget):
                raise ValueError(f"override {list(self.override)} needs one class per forget class {list(self.forget)}")
            for f, o in zip(self.forget, self.override):
                if not 0 <= o < self.num_classes:
                    raise ValueError(f"override class {o} (for forget class {f}) is out of range; {allowed}")
                if o in self.forget:
                    what = "equals the forget class" if o == f else "is itself a forget class"
                    raise ValueError(f"override class {o} for forget class {f} {what}; an override must be "
                                     f"a remaining class: {list(self.remain)}")

    @classmethod
    def from_config(cls, config, num_classes: int) -> "ForgetSpec":
        return cls(num_classes, tuple(config.forget_classes), config.override_classes)

    @property
    def remain(self) -> tuple[int, ...]:
        return tuple(c for c in range(self.num_classes) if c not in self.forget)

    def override_of(self, forget_class: int) -> int | None:
        """The fixed override of a forget class (None when overrides are random)."""
        return None if self.override is None else self.override[self.forget.index(forget_class)]

    def sample(self, n_remain: int, n_forget: int, generator: torch.Generator | None,
               device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(remain labels (n_remain,), forget labels (n_forget,), their override labels (n_forget,))."""
        remain, forget = _label_table(self.remain, str(device)), _label_table(self.forget, str(device))
        labels_r = remain[torch.randint(len(self.remain), (n_remain,), generator=generator, device=device)]
        pick = torch.randint(len(self.forget), (n_forget,), generator=generator, device=device)
        labels_f = forget[pick]
        if self.override is None:
            labels_o = remain[torch.randint(len(self.remain), (n_forget,), generator=generator, device=device)]
        else:
            labels_o = _label_table(self.override, str(device))[pick]
        return labels_r, labels_f, labels_o

    def sample_conditions(self, n_remain: int, n_forget: int, generator: torch.Generator | None,
                          device: torch.device | str) -> "Conditions":
        """Stacked conditions of one SFD batch: remain samples first, then forget samples."""
        labels_r, labels_f, labels_o = self.sample(n_remain, n_forget, generator, device)
        c_gen = torch.cat([labels_r, labels_f])
        return Conditions(generator=c_gen, teacher=torch.cat([labels_r, labels_o]), fake_train=c_gen)


@dataclass(frozen=True)
class Conditions:
    """What each network is conditioned on in one step (B = n_remain + n_forget, remain first).

    generator: c for G and for the fake score in the generator step (forget samples keep c_f).
    teacher: c for the teacher; forget samples carry their override c_o (the score-based MU loss).
    fake_train: c for the fake-score step (equals ``generator`` here; text models drop prompts).
    Any object with a ``sample_conditions`` method returning this can drive ``train_step``.
    """

    generator: torch.Tensor
    teacher: torch.Tensor
    fake_train: torch.Tensor
