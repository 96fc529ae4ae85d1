"""Fine-tuning baselines that unlearn inside the diffusion model itself (sampled with Heun).

Three methods share one loop: a copy theta of the frozen original phi is fine-tuned on
  L = forget_loss(x_t^f) + gamma * ||D_theta(x_t^r, s, c_r) - D_phi(x_t^r, s, c_r)||^2   (EDM-weighted),
with data-free x_t: the *current* model's Euler sampler runs from sigma_max to a random level of
an EDM schedule (as ESD runs DDIM to a random t), conditioned on the sample's class.

- "esd" (Gandikota et al. 2023, our label-conditional reading): target
  D_null - eta (D_phi(c_f) - D_null), i.e. negative guidance away from c_f. D_null is the
  teacher's null label when it was trained with label dropout (``pretrain-teacher
  --label-dropout``); a teacher without one has no unconditional score, and D_null falls back to
  the *mean of the teacher's K class-conditional denoisers* (K extra forwards, no grad). All
  weights train; gamma = 0.
- "retain_distill" (Schioppa et al. 2024 style): forget target D_phi(x_t, s, c_o) (c_f remapped
  onto its override) plus retain distillation; all weights train.
- "advunlearn" (Zhang et al. 2024, label-conditional reading): only the class-embedding table
  trains (the analogue of the text encoder). Inner attack: per-sample offsets delta minimise
  ||D_theta(x_t, s, e_f + delta) - D_phi(x_t, s, c_f)||^2 (re-elicit c_f); outer step: the ESD
  loss at e_f + delta plus gamma * retain distillation.
All squared errors go through ``losses.edm_denoising_loss`` with lambda(sigma) weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..core.forget import ForgetSpec
from ..core.losses import edm_denoising_loss, edm_loss_weight
from ..models.sampler import edm_sigma_steps

METHODS = ("esd", "retain_distill", "advunlearn")
# Adam lr per method when FinetuneConfig.lr is None. Whole-network fine-tuning moves every weight
# by ~lr per step, so 1e-4 suffices; AdvUnlearn trains one class-embedding row (norm ~11, entries
# ~0.8 on the demo teacher), which 1e-4 x 20 steps moved by 0.1% of its norm - a no-op (issue 15).
# 1e-2 moves it by a sizeable fraction of its norm within a compare budget (tests/test_baselines.py).
DEFAULT_LR = {"esd": 1e-4, "retain_distill": 1e-4, "advunlearn": 1e-2}


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one fine-tuning baseline run."""

    method: str = "esd"              # one of METHODS
    lr: float | None = None          # Adam learning rate; None = DEFAULT_LR[method] (paper scale 1e-5 at 1000 iterations)
    batch_size: int = 8              # forget samples per step
    retain_batch_size: int = 8       # remaining-class samples per step (unused by esd)
    eta: float = 1.0                 # negative-guidance strength of the ESD target
    gamma: float | None = None       # retain-distillation weight; None = 0 for esd, 1 otherwise
    trajectory_steps: int = 8        # EDM schedule length from which x_t's noise level is drawn
    inner_steps: int = 3             # advunlearn: Adam steps of the inner attack
    inner_lr: float = 0.1            # advunlearn: inner attack learning rate
    seed: int = 0                    # seeds the run's torch.Generator

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown fine-tuning method {self.method!r}; allowed: {METHODS}")
        for name in ("batch_size", "retain_batch_size", "trajectory_steps", "inner_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 or None (the method's default {DEFAULT_LR[self.method]}), got {self.lr}")

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    @property
    def retain_weight(self) -> float:
        if self.gamma is not None:
            return self.gamma
        return 0.0 if self.method == "esd" else 1.0


class FinetuneUnlearner:
    """State and step of one fine-tuning baseline; ``model`` is the unlearned denoiser."""

    def __init__(self, teacher: nn.Module, spec: ForgetSpec, config: FinetuneConfig):
        self.config, self.spec = config, spec
        self.original = teacher.eval().requires_grad_(False)
        self.model = copy.deepcopy(teacher).train().requires_grad_(config.method != "advunlearn")
        table = self.model.unet.class_embedding.weight
        table.requires_grad_(True)
        if config.method == "advunlearn":
            # Only the forget rows defend. The retain rows equal the original's, so their retain-loss
            # gradient is 0 up to float noise (~1e-12 with multi-threaded reductions) that Adam
            # would blow up to lr-sized steps: mask it to an exact zero.
            rows = torch.zeros(table.shape[0], 1, device=table.device)
            rows[list(spec.forget)] = 1.0
            table.register_hook(lambda grad: grad * rows)
        params = [table] if config.method == "advunlearn" else list(self.model.parameters())
        self.opt = torch.optim.Adam(params, lr=config.learning_rate)
        self.device = table.device
        self.rng = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sigmas = edm_sigma_steps(config.trajectory_steps, device=self.device).float()
        self.step_count = 0

    # ----------------------------------------------------------------- data-free x_t
    @torch.no_grad()
    def draw_xt(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t (B, C, H, W), sigma (B,)): the current model's Euler path under c, stopped at a random level."""
        n = len(c)
        stop = int(torch.randint(1, len(self.sigmas) - 1, (1,), generator=self.rng))  # host int: outside any hot loop
        x = torch.randn((n, *self.model.image_shape), generator=self.rng, device=self.device) * self.sigmas[0]
        for i in range(stop):
            s, s_next = self.sigmas[i], self.sigmas[i + 1]
            x = x + (s_next - s) * (x - self.model(x, s.expand(n), c)) / s
        return x, self.sigmas[stop].expand(n).clone()

    @torch.no_grad()
    def esd_target(self, x_t: torch.Tensor, sigma: torch.Tensor, c_f: torch.Tensor) -> torch.Tensor:
        """D_null - eta (D_phi(c_f) - D_null).

        D_null is the teacher's unconditional denoiser at its null label when it was trained with
        label dropout (ESD's own definition); otherwise the mean over the K classes of D_phi(x_t, s, k),
        which equals the unconditional score only where the class posteriors are uniform (high noise).
        """
        n, null = len(x_t), getattr(self.original, "null_label", None)
        if null is not None:
            labels = torch.cat([c_f, torch.full_like(c_f, null)])
            d_f, d_null = self.original(x_t.repeat(2, 1, 1, 1), sigma.repeat(2), labels).chunk(2)
            return d_null - self.config.eta * (d_f - d_null)
        k = self.spec.num_classes
        labels = torch.arange(k, device=self.device).repeat_interleave(n)
        d_all = self.original(x_t.repeat(k, 1, 1, 1), sigma.repeat(k), labels).view(k, n, *x_t.shape[1:])
        d_null = d_all.mean(0)
        return d_null - self.config.eta * (d_all[c_f, torch.arange(n, device=self.device)] - d_null)

    def _table_rows(self, labels: torch.Tensor) -> torch.Tensor:
        return self.model.unet.class_embedding.weight[labels]

    def adversarial_offsets(self, x_t, sigma, c_f) -> torch.Tensor:
        """AdvUnlearn's inner attack: delta (B, E) with D_theta(e_f + delta) ~ D_phi(c_f)."""
        with torch.no_grad():
            target = self.original(x_t, sigma, c_f)
        base = self._table_rows(c_f).detach()
        delta = torch.zeros_like(base, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.config.inner_lr)
        for _ in range(self.config.inner_steps):
            loss = (self.model(x_t, sigma, base + delta) - target).square().sum()
            (delta.grad,) = torch.autograd.grad(loss, delta)
            opt.step()
        return delta.detach()

    # ----------------------------------------------------------------- one step
    def step(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        c_r, c_f, c_o = self.spec.sample(cfg.retain_batch_size, cfg.batch_size, self.rng, self.device)
        x_f, s_f = self.draw_xt(c_f)
        cond_f: torch.Tensor = c_f
        if cfg.method == "retain_distill":
            with torch.no_grad():
                target_f = self.original(x_f, s_f, c_o)
        else:
            target_f = self.esd_target(x_f, s_f, c_f)
            if cfg.method == "advunlearn":
                cond_f = self._table_rows(c_f) + self.adversarial_offsets(x_f, s_f, c_f)
        w_f = edm_loss_weight(s_f, self.model.sigma_data) / len(c_f)
        loss_f, _ = edm_denoising_loss(self.model(x_f, s_f, cond_f), target_f, w_f)
        loss = loss_f
        loss_r = torch.zeros((), device=self.device)
        if cfg.retain_weight > 0:
            x_r, s_r = self.draw_xt(c_r)
            with torch.no_grad():
                target_r = self.original(x_r, s_r, c_r)
            w_r = edm_loss_weight(s_r, self.model.sigma_data) * (cfg.retain_weight / len(c_r))
            loss_r, _ = edm_denoising_loss(self.model(x_r, s_r, c_r), target_r, w_r)
            loss = loss + loss_r
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.model.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        self.opt.step()
        self.step_count += 1
        return {"loss_forget": loss_f.detach(), "loss_retain": loss_r.detach()}


__all__ = ["METHODS", "FinetuneConfig", "FinetuneUnlearner"]
