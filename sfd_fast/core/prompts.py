"""Concepts to forget in a text-to-image model, and the prompt sampler that drives ``train_step``.

``ConceptSpec`` holds strings: forget prompts, their override ("safe") prompts, remaining
prompts and the CFG negative prompt. Three ways to build one (SPEC section 3):
pairs, a substitution rule over prompt templates ("brad pitt" -> "a middle aged man"), or
keywords x subjects (nudity style: "nude woman" -> "woman", keywords as the negative prompt).
``PromptConditions`` holds their embeddings, computed once, and samples each step's
``Conditions`` without host syncs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .forget import Conditions

DEFAULT_TEMPLATES = ("{}", "a photo of {}", "a portrait of {}", "a painting of {}", "{} smiling", "{} outdoors")


@dataclass(frozen=True)
class ConceptSpec:
    """forget[i] is replaced by override[i]; remain prompts keep their own generations."""

    forget: tuple[str, ...]
    override: tuple[str, ...]
    remain: tuple[str, ...]
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if not self.forget:
            raise ValueError("no forget prompt given; give at least one concept to forget")
        if len(self.override) != len(self.forget):
            raise ValueError(f"{len(self.forget)} forget prompts but {len(self.override)} override prompts; "
                             "give one override per forget prompt")
        if not self.remain:
            raise ValueError("no remaining prompt given; SFD needs prompts whose generations must not change")
        for f, o in zip(self.forget, self.override):
            if f == o:
                raise ValueError(f"forget prompt {f!r} equals its override; the override must differ")
        overlap = sorted(set(self.forget) & set(self.remain))
        if overlap:
            raise ValueError(f"prompts {overlap} are both forgotten and remaining; remove them from one list")

    @classmethod
    def from_pairs(cls, pairs, remain, negative_prompt: str = "") -> "ConceptSpec":
        """pairs: iterable of (forget prompt, override prompt)."""
        pairs = list(pairs)
        return cls(tuple(f for f, _ in pairs), tuple(o for _, o in pairs), tuple(remain), negative_prompt)

    @classmethod
    def from_substitution(cls, concept: str, replacement: str, remain, templates=DEFAULT_TEMPLATES,
                          negative_prompt: str = "") -> "ConceptSpec":
        """Every template ("a photo of {}") with the concept -> the same template with its replacement."""
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"templates {bad} must each contain exactly one '{{}}' placeholder")
        return cls.from_pairs([(t.format(concept), t.format(replacement)) for t in templates], remain, negative_prompt)

    @classmethod
    def from_keywords(cls, keywords, subjects, remain) -> "ConceptSpec":
        """"<keyword> <subject>" -> "<subject>" for every pair; the keywords become the negative prompt."""
        keywords, subjects = tuple(keywords), tuple(subjects)
        if not keywords or not subjects:
            raise ValueError(f"keyword mode needs keywords and subjects, got {list(keywords)} and {list(subjects)}")
        pairs = [(f"{k} {s}", s) for k in keywords for s in subjects]
        return cls.from_pairs(pairs, remain, negative_prompt=", ".join(keywords))


def read_prompts(path: str | os.PathLike) -> tuple[str, ...]:
    """Prompts from a text file, one per line; blank lines and '#' comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    prompts = tuple(line.strip() for line in path.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompt (one per line expected)")
    return prompts


@dataclass(frozen=True)
class PromptConditions:
    """Cached embeddings of a ConceptSpec; ``sample_conditions`` makes one step's ``Conditions``.

    remain (R, L, D), forget (F, L, D), override (F, L, D), empty (1, L, D) = embedding of "",
    negative (1, L, D) = embedding of the negative prompt (CFG's unconditional branch).
    """

    remain: torch.Tensor
    forget: torch.Tensor
    override: torch.Tensor
    empty: torch.Tensor
    negative: torch.Tensor
    drop_prob: float = 0.1  # share of fake-score training prompts replaced by "" (SPEC section 3)

    def __post_init__(self) -> None:
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f"drop_prob must be in [0, 1), got {self.drop_prob}")

    @classmethod
    def encode(cls, spec: ConceptSpec, pipeline, drop_prob: float = 0.1) -> "PromptConditions":
        """Encode every prompt of ``spec`` once with the pipeline's text encoder."""
        enc = pipeline.encode_prompts
        return cls(enc(spec.remain), enc(spec.forget), enc(spec.override), enc([""]),
                   enc([spec.negative_prompt]), drop_prob)

    def to(self, device) -> "PromptConditions":
        return PromptConditions(*(t.to(device) for t in (self.remain, self.forget, self.override, self.empty,
                                                            self.negative)), self.drop_prob)

    def sample_conditions(self, n_remain: int, n_forget: int, generator: torch.Generator | None,
                          device: torch.device | str) -> Conditions:
        """Embeddings (n_remain + n_forget, L, D), remain first; the teacher sees overrides on forget rows."""
        pick_r = torch.randint(self.remain.shape[0], (n_remain,), generator=generator, device=device)
        pick_f = torch.randint(self.forget.shape[0], (n_forget,), generator=generator, device=device)
        remain = self.remain.to(device)[pick_r]
        c_gen = torch.cat([remain, self.forget.to(device)[pick_f]])
        c_teacher = torch.cat([remain, self.override.to(device)[pick_f]])
        drop = torch.rand(n_remain + n_forget, generator=generator, device=device) < self.drop_prob
        c_fake = torch.where(drop.view(-1, 1, 1), self.empty.to(device), c_gen)
        return Conditions(generator=c_gen, teacher=c_teacher, fake_train=c_fake)


__all__ = ["ConceptSpec", "PromptConditions", "read_prompts", "DEFAULT_TEMPLATES"]
