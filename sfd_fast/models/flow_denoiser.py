"""A rectified-flow velocity transformer (SD3-style) as the library's x0 denoiser D(x, sigma, c).

Flow matching (diffusers' ``FlowMatchEulerDiscreteScheduler``) noises as x_t = (1 - t) x0 + t eps,
t in [0, 1], and the network predicts the velocity v = eps - x0 at model timestep t * T
(T = ``num_train_timesteps``, 1000). The EDM view of the same point (SPEC notation) is
  x_edm = x_t / (1 - t) = x0 + sigma eps,  sigma = t / (1 - t),  i.e.  t = sigma / (1 + sigma),
so D(x_edm, sigma, c) = x_t - t v(x_t, t T, c) with x_t = x_edm / (1 + sigma): exact x0 for the
exact velocity. The scheduler's ``shift`` (SD3: 3.0) only reshapes the *sampling* schedule
(sigma' = shift s / (1 + (shift - 1) s)); the model's input is always the already-shifted t, with
timestep t * T. So the adapter needs T alone, and a scheduler step from t to 0,
x_t + (0 - t) v, is exactly D (tested against the scheduler itself).

SFD's noise levels keep their EDM definition (SPEC section 2): the fake-score ln sigma ~ N(-1.2, 1.2^2)
and the generator step's sigma in [0.002, ~24.4] are t = sigma / (1 + sigma) in [0.002, ~0.961].

The generator. For EDM/DDPM teachers G(z) = D(sigma_init z, sigma_init). A flow sampler instead
starts from unit-variance noise x_t = z, and so does every diffusers flow pipeline (its latents are
never scaled), so a flow generator is ``FlowOneStepGenerator``: G(z) = D((1 + sigma_init) z,
sigma_init) = z - t_init v(z, t_init T), i.e. x_t = z at t_init = sigma_init / (1 + sigma_init)
(0.714 for the default 2.5). Then the stock pipeline called with ``sigmas=[t_init]`` and one step
is G, with no input scaling of ours (``one_step_flow_scheduler``).

The network is a diffusers ``SD3Transformer2DModel`` (joint attention over image patches and text
tokens, plus pooled projections); the condition c packs token embeddings and the pooled vector
into one tensor (``text_condition.PackedText``). CFG works as in ``LatentDenoiser`` (linear in v,
so guiding v is guiding D). Attention runs through diffusers' default processor, i.e.
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
from torch import nn

from .latent_denoiser import FLOW_SCHEDULERS, GuidedTextDenoiser, is_flow_schedule
from .networks import OneStepGenerator, batch_sigma
from .text_condition import PackedText

# What a flow transformer must expose to be driven by text: config keys and the forward's arguments.
SD3_CONDITIONING = ("joint_attention_dim", "pooled_projection_dim")


def flow_time(sigma: torch.Tensor) -> torch.Tensor:
    """t = sigma / (1 + sigma): the flow time of EDM noise level sigma (sigma = inf -> t = 1)."""
    return sigma / (1 + sigma)


def edm_sigma(t: torch.Tensor | float) -> torch.Tensor | float:
    """sigma = t / (1 - t): the EDM noise level of flow time t in [0, 1)."""
    return t / (1 - t)


def require_flow_schedule(scheduler_config: dict, where: str = "FlowDenoiser") -> None:
    name = scheduler_config.get("_class_name")
    if not is_flow_schedule(scheduler_config):
        raise ValueError(f"{where} needs a flow-matching scheduler ({', '.join(FLOW_SCHEDULERS)}), got {name!r}; "
                         "DDPM-family teachers (epsilon / v prediction UNets) go with LatentDenoiser")
    for key in ("invert_sigmas", "stochastic_sampling"):
        if scheduler_config.get(key):
            raise ValueError(f"{where}: a flow scheduler with {key}=True is not supported (its sigmas do not "
                             "follow x_t = (1 - t) x0 + t eps with a deterministic step)")


def require_sd3_conditioning(config: dict, where: str) -> None:
    """ValueError unless a transformer config (a loaded model's or its config.json) is text-conditioned the SD3
    way (joint attention + pooled projections); ``where`` names the transformer in the message."""
    missing = [k for k in SD3_CONDITIONING if config.get(k) is None]
    if missing:
        raise ValueError(f"{where} lacks the text conditioning FlowDenoiser drives (config {', '.join(missing)} "
                         "missing); supported: SD3Transformer2DModel (joint attention on encoder_hidden_states + "
                         "pooled_projections)")


class FlowDenoiser(GuidedTextDenoiser):
    """D(x, sigma, c) over a flow-matching transformer: x (B, C, h, w), sigma (B,), c packed (B, L + k, D)."""

    kind = "flow"
    network_subfolder = "transformer"

    def __init__(self, transformer: nn.Module, scheduler_config: dict, layout: PackedText,
                 guidance_scale: float = 1.0, negative_embedding: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        require_flow_schedule(scheduler_config)
        require_sd3_conditioning(dict(transformer.config), type(transformer).__name__)
        if layout.width != int(transformer.config.joint_attention_dim) or \
                layout.pooled_dim != int(transformer.config.pooled_projection_dim):
            raise ValueError(f"text layout {layout} does not fit the transformer (joint_attention_dim "
                             f"{transformer.config.joint_attention_dim}, pooled_projection_dim "
                             f"{transformer.config.pooled_projection_dim})")
        self.transformer = transformer
        self.layout = layout
        self.scheduler_config = dict(scheduler_config)
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        self._init_guidance(guidance_scale, negative_embedding, compute_dtype)

    @property
    def network(self) -> nn.Module:
        return self.transformer

    @property
    def prediction_type(self) -> str:
        return "flow (velocity eps - x0)"

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model timestep t * T (B,) of EDM sigma (B,), as the scheduler's ``timesteps`` hold it."""
        return flow_time(sigma) * self.num_train_timesteps

    def network_call(self, x_in: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        hidden, pooled = self.layout.unpack(c)
        return self.transformer(hidden_states=x_in, encoder_hidden_states=hidden, pooled_projections=pooled,
                                timestep=t, return_dict=False)[0]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self._check_condition(x, c)
        sigma = batch_sigma(sigma, x)
        t = flow_time(sigma)
        x_t = x.to(sigma.dtype) / (1 + sigma)
        v = self.guided_output(x_t, (t * self.num_train_timesteps).flatten(), c).to(x_t.dtype)
        return x_t - t * v


class FlowOneStepGenerator(OneStepGenerator):
    """G(z, c) = D((1 + sigma_init) z, sigma_init, c) = z - t_init v(z, t_init): flow input x_t = z (unit noise).

    Shares the denoiser (and so the parameters) it is built from; see the module docstring for why a
    flow generator takes z unscaled.
    """

    @property
    def t_init(self) -> float:
        return self.sigma_init / (1 + self.sigma_init)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device, dtype=torch.float32)
        return self.denoiser((1 + self.sigma_init) * z, sigma, c)

    def one_step_scheduler(self):
        return one_step_flow_scheduler(self.denoiser.scheduler_config)


def one_step_flow_scheduler(scheduler_config: dict):
    """The teacher's FlowMatchEulerDiscreteScheduler with ``shift=1`` and no dynamic shifting.

    Called with ``sigmas=[t_init]`` (``num_inference_steps=1``), its schedule is then exactly
    [t_init, 0] at timestep t_init * T, and its one Euler step z + (0 - t_init) v is G. (With
    ``num_inference_steps=1`` alone every flow schedule starts at t = 1, pure noise: config cannot
    put the step elsewhere, so the call passes ``sigmas``.)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    require_flow_schedule(scheduler_config, "a one-step flow scheduler")
    return FlowMatchEulerDiscreteScheduler.from_config(
        scheduler_config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False)


__all__ = ["FlowDenoiser", "FlowOneStepGenerator", "flow_time", "edm_sigma", "one_step_flow_scheduler",
           "require_flow_schedule", "require_sd3_conditioning", "SD3_CONDITIONING"]
