"""Conditioning-space attack (SPEC sections 4-5): can a learned class embedding bring c_f back?

The denoisers accept c as float class embeddings (B, E) in place of labels (see
``networks.LabelOrVectorEmbedding``), so an attacker who holds the unlearned model can search
the embedding space directly. The attack learns one vector e (E,) with Adam for ``steps``
steps, minimising the evaluation classifier's cross-entropy towards the forgotten class on
images rendered from e. Attack success rate (ASR) = share of images classified as c_f, on
held-out noise, before (from the initial e) and after the attack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.networks import OneStepGenerator
from ..models.sampler import edm_heun_sample, heun_sample

INITS = ("forget", "mean", "random")


@dataclass(frozen=True)
class AttackConfig:
    """The attack budget; reported next to every ASR."""

    steps: int = 30                 # Adam steps on the embedding
    lr: float = 0.05                # Adam learning rate (embedding units)
    batch_size: int = 16            # noises per attack step (fresh each step)
    init: str = "forget"            # start: the model's own row of c_f | the table mean | N(0, I)
    eval_samples: int = 100         # held-out noises that score ASR before and after
    seed: int = 0                   # seeds the init, the attack noise and the evaluation noise

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"unknown attack init {self.init!r}; allowed: {INITS}")
        for name in ("steps", "batch_size", "eval_samples"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"attack {name} must be >= {0 if name == 'steps' else 1}, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"attack lr must be > 0, got {self.lr}")


@dataclass
class AttackTarget:
    """What the attacker needs of a model.

    render(z (B,C,H,W), e (B,E)) -> images, differentiable in e (the attack's forward path);
    sample(z, e) -> images, the model's evaluation sampler (may be longer than ``render``);
    table (K, E): the model's class-embedding table, where the init is read.
    """

    render: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    table: torch.Tensor
    image_shape: tuple[int, ...]

    @classmethod
    def for_generator(cls, generator: OneStepGenerator) -> "AttackTarget":
        """A one-step generator: one forward both to attack and to evaluate."""
        return cls(generator, torch.no_grad()(generator), embedding_table(generator.denoiser),
                   generator.denoiser.image_shape)

    @classmethod
    def for_denoiser(cls, denoiser: nn.Module, eval_steps: int, attack_steps: int) -> "AttackTarget":
        """A diffusion model sampled with Heun: attacked through ``attack_steps`` differentiable steps
        (backprop through the full sampler is too costly), evaluated with ``eval_steps``."""
        return cls(lambda z, e: heun_sample(denoiser, z, e, attack_steps),
                   lambda z, e: edm_heun_sample(denoiser, z, e, eval_steps),
                   embedding_table(denoiser), denoiser.image_shape)


def embedding_table(denoiser: nn.Module) -> torch.Tensor:
    """The (K, E) class-embedding weights of an EDM/DDPM denoiser (detached)."""
    emb = getattr(getattr(denoiser, "unet", None), "class_embedding", None)
    if emb is None:
        raise ValueError(f"{type(denoiser).__name__} has no unet.class_embedding to attack")
    return emb.weight.detach()


@dataclass
class AttackResult:
    asr_before: float
    asr_after: float
    embedding: torch.Tensor          # (E,) the learned condition
    losses: list[float]              # cross-entropy per attack step (host floats: the attack is not hot)
    budget: dict

    def summary(self) -> dict:
        return {"asr_before": self.asr_before, "asr_after": self.asr_after, "attack": self.budget}


def _initial_embedding(table: torch.Tensor, forget_class: int, init: str, gen: torch.Generator) -> torch.Tensor:
    if init == "forget":
        return table[forget_class].clone()
    if init == "mean":
        return table.mean(0)
    return torch.randn(table.shape[1], generator=gen, device=table.device, dtype=table.dtype)


@torch.no_grad()
def attack_success_rate(target: AttackTarget, classifier: nn.Module, embedding: torch.Tensor, forget_class: int,
                        z: torch.Tensor, batch_size: int = 250) -> float:
    """Share of images sampled from ``embedding`` (E,) at noises z (N, C, H, W) classified as c_f."""
    hits = 0
    for zb in z.split(batch_size):
        images = target.sample(zb, embedding.expand(len(zb), -1))
        hits += int((classifier(images).argmax(1) == forget_class).sum())
    return hits / len(z)


def embedding_attack(target: AttackTarget, classifier: nn.Module, forget_class: int,
                     config: AttackConfig = AttackConfig()) -> AttackResult:
    """Learn an embedding that makes ``target`` produce ``forget_class`` (judged by ``classifier``)."""
    num_classes = target.table.shape[0]
    if not 0 <= forget_class < num_classes:
        raise ValueError(f"forget_class {forget_class} is out of range; allowed: 0..{num_classes - 1}")
    device = target.table.device
    gen = torch.Generator(device=device).manual_seed(config.seed)
    e = _initial_embedding(target.table, forget_class, config.init, gen).float().requires_grad_(True)
    z_eval = torch.randn((config.eval_samples, *target.image_shape), generator=gen, device=device)
    before = attack_success_rate(target, classifier, e.detach(), forget_class, z_eval)
    opt = torch.optim.Adam([e], lr=config.lr)
    labels = torch.full((config.batch_size,), forget_class, device=device)
    losses = []
    for _ in range(config.steps):
        z = torch.randn((config.batch_size, *target.image_shape), generator=gen, device=device)
        loss = F.cross_entropy(classifier(target.render(z, e.expand(config.batch_size, -1))), labels)
        # Gradient for e only: the model and the classifier stay untouched (no .grad written).
        (e.grad,) = torch.autograd.grad(loss, e)
        opt.step()
        losses.append(float(loss.detach()))
    after = attack_success_rate(target, classifier, e.detach(), forget_class, z_eval)
    return AttackResult(before, after, e.detach(), losses, asdict(config))


__all__ = ["AttackConfig", "AttackTarget", "AttackResult", "embedding_table", "attack_success_rate",
           "embedding_attack", "INITS"]
