"""FlowDenoiser (rectified-flow velocity transformer as D(x, sigma, c)) against diffusers' own
FlowMatchEulerDiscreteScheduler arithmetic, on a tiny random SD3 transformer (real diffusers model).

Truth: the scheduler, configured as SD3 ships it (shift 3.0), sets its (shifted) sigmas; the model
sees the scheduler's timestep; one ``scheduler.step`` from sigma to 0 is the x0 estimate, and a
step from sigma_i to sigma_{i+1} of a 28-step schedule is an Euler step. Ours: the same point in
EDM units, x_edm = x_t / (1 - t), sigma_edm = t / (1 - t), through ``FlowDenoiser``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra (transformers)")

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402

from sfd_fast.models.flow_denoiser import (FlowDenoiser, FlowOneStepGenerator, edm_sigma,  # noqa: E402
                                           flow_time, require_sd3_conditioning)
from sfd_fast.models.text_condition import PackedText  # noqa: E402

L, D, P = 12, 32, 48  # token rows, joint attention width, pooled width (P > D: two packed rows)
FP32_TOL = 1e-5       # the limit on max |ours - scheduler| in fp32


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=4, joint_attention_dim=D,
                                 caption_projection_dim=32, pooled_projection_dim=P, pos_embed_max_size=16).eval()


@pytest.fixture(scope="module")
def scheduler():
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's config


LAYOUT = PackedText(L, D, P)


def _condition(batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden, pooled = torch.randn(batch, L, D, generator=g), torch.randn(batch, P, generator=g)
    return hidden, pooled, LAYOUT.pack(hidden, pooled)


def test_packed_text_round_trip():
    hidden, pooled, c = _condition(3)
    assert c.shape == (3, L + 2, D) and LAYOUT.extra_rows == 2
    h, p = LAYOUT.unpack(c)
    assert torch.equal(h, hidden) and torch.equal(p, pooled)
    assert torch.equal(c[:, L + 1, P - D:], torch.zeros(3, 2 * D - P))  # zero padding after the pooled values
    with pytest.raises(ValueError, match="token rows"):
        LAYOUT.unpack(hidden)


def test_flow_time_and_sigma_are_inverse():
    t = torch.tensor([1e-3, 0.25, 0.5, 0.714285, 0.999], dtype=torch.float64)
    torch.testing.assert_close(flow_time(edm_sigma(t)), t, rtol=1e-12, atol=0)
    assert float(flow_time(torch.tensor(2.5))) == pytest.approx(2.5 / 3.5)


def _truth_x0(transformer, scheduler, x_t, t_unshifted, hidden, pooled, dtype=torch.float32):
    """diffusers: set_timesteps(sigmas=[s]) (shift applied), model at its timestep, one step to sigma 0."""
    scheduler.set_timesteps(sigmas=[t_unshifted])
    assert scheduler.sigmas[-1] == 0 and len(scheduler.timesteps) == 1
    timestep = scheduler.timesteps[0]
    with torch.no_grad():
        v = transformer(hidden_states=x_t.to(dtype), encoder_hidden_states=hidden.to(dtype),
                        pooled_projections=pooled.to(dtype), timestep=timestep.expand(x_t.shape[0]),
                        return_dict=False)[0]
    x0 = scheduler.step(v, timestep, x_t, return_dict=False)[0]
    return x0.float(), float(scheduler.sigmas[0]), float(timestep)


@pytest.mark.parametrize("t_unshifted", [0.02, 0.3, 0.5, 0.9, 0.999])
def test_fp32_step_to_zero_equals_denoiser(transformer, scheduler, t_unshifted):
    hidden, pooled, c = _condition(3)
    x_t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected, t, timestep = _truth_x0(transformer, scheduler, x_t, t_unshifted, hidden, pooled)
    assert t == pytest.approx(3 * t_unshifted / (1 + 2 * t_unshifted), rel=1e-6)  # SD3's shift was applied
    denoiser = FlowDenoiser(transformer, dict(scheduler.config), LAYOUT)
    seen = []
    hook = transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()),
                                                 with_kwargs=True)
    try:
        sigma = torch.tensor(edm_sigma(t), dtype=torch.float32).expand(3)
        with torch.no_grad():
            ours = denoiser(x_t / (1 - t), sigma, c)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0], torch.full((3,), timestep), rtol=1e-6, atol=1e-4)  # model timestep = t*1000
    err = float((ours - expected).abs().max())
    assert err <= FP32_TOL, f"max |D - scheduler x0| = {err:.3g} at t = {t:.4f}"


def test_fp32_whole_shifted_schedule_as_euler_steps(transformer, scheduler):
    """Every step of a 28-step SD3 schedule, x_{i+1} = x_i + (s_{i+1} - s_i) v, equals Euler with our D.

    The first step starts at t = 1 (pure noise), sigma = inf in EDM units: no D there (SFD's noise levels
    stay below t ~ 0.96), so it is taken from the scheduler and the comparison starts at step 1.
    """
    hidden, pooled, c = _condition(2, seed=3)
    denoiser = FlowDenoiser(transformer, dict(scheduler.config), LAYOUT)
    scheduler.set_timesteps(28)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    worst, steps = 0.0, 0
    with torch.no_grad():
        for i, timestep in enumerate(scheduler.timesteps):
            s, s_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
            v = transformer(hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled,
                            timestep=timestep.expand(2), return_dict=False)[0]
            truth = scheduler.step(v, timestep, x, return_dict=False)[0]
            if s == 1.0:
                x = truth
                continue
            d = denoiser(x / (1 - s), torch.tensor(edm_sigma(s)).expand(2).float(), c)
            ours = x + (s_next - s) * (x - d) / s  # velocity from D: v = (x_t - x0) / t
            worst, steps = max(worst, float((ours - truth).abs().max())), steps + 1
            x = truth
    assert steps == 27 and worst <= FP32_TOL, f"max per-step error {worst:.3g}"


def test_bf16_within_twice_plain_bf16_error(transformer, scheduler):
    """bf16 weights: our error against the fp32 truth is at most 2x diffusers' own bf16 error (+ 1e-3)."""
    import copy

    hidden, pooled, c = _condition(3)
    x_t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    bf16 = copy.deepcopy(transformer).to(torch.bfloat16)
    for t_unshifted in (0.1, 0.5, 0.95):
        truth, t, _ = _truth_x0(transformer, scheduler, x_t, t_unshifted, hidden, pooled)
        plain, _, _ = _truth_x0(bf16, scheduler, x_t, t_unshifted, hidden, pooled, dtype=torch.bfloat16)
        with torch.no_grad():
            ours = FlowDenoiser(bf16, dict(scheduler.config), LAYOUT)(
                x_t / (1 - t), torch.tensor(edm_sigma(t)).float().expand(3), c)
        assert ours.dtype == torch.float32  # the epilogue runs in fp32
        err_ours, err_plain = float((ours - truth).abs().max()), float((plain - truth).abs().max())
        assert 0 < err_plain and err_ours <= 2 * err_plain + 1e-3, (t, err_ours, err_plain)


def test_cfg_is_linear_in_velocity(transformer, scheduler):
    _, _, c = _condition(2)
    _, _, negative = _condition(1, seed=9)
    plain = FlowDenoiser(transformer, dict(scheduler.config), LAYOUT)
    guided = FlowDenoiser(transformer, dict(scheduler.config), LAYOUT, 3.0, negative)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.4, 4.0])
    with torch.no_grad():
        d_c, d_n, d_g = plain(x, sigma, c), plain(x, sigma, negative.expand(2, -1, -1)), guided(x, sigma, c)
    torch.testing.assert_close(d_g, d_n + 3.0 * (d_c - d_n), atol=2e-5, rtol=1e-5)


def test_flow_generator_takes_unit_noise_at_t_init(transformer, scheduler):
    """G(z) = z - t_init v(z, t_init): the stock scheduler's one step from sigmas=[t_init] (shift 1)."""
    from sfd_fast.models.flow_denoiser import one_step_flow_scheduler

    hidden, pooled, c = _condition(2)
    g = FlowOneStepGenerator(FlowDenoiser(transformer, dict(scheduler.config), LAYOUT), 2.5)
    assert g.t_init == pytest.approx(2.5 / 3.5)
    one = one_step_flow_scheduler(dict(scheduler.config))
    z = torch.randn(2, 4, 8, 8)
    expected, t, _ = _truth_x0(transformer, one, z, g.t_init, hidden, pooled)
    assert t == pytest.approx(g.t_init, rel=1e-6)  # shift 1: the sigma passed is the sigma used
    with torch.no_grad():
        assert float((g(z, c) - expected).abs().max()) <= FP32_TOL


def test_bad_inputs_are_one_clear_value_error(transformer, scheduler):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from sfd_fast.models.latent_denoiser import LatentDenoiser

    with pytest.raises(ValueError, match="flow-matching .*FlowDenoiser"):  # flow model into the DDPM adapter
        LatentDenoiser(UNet2DConditionModel(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                            sample_size=8, layers_per_block=1, attention_head_dim=8,
                                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                       dict(scheduler.config))
    with pytest.raises(ValueError, match="needs a flow-matching scheduler"):
        FlowDenoiser(transformer, dict(DDPMScheduler().config), LAYOUT)
    no_pooled = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                      num_attention_heads=2, joint_attention_dim=D, caption_projection_dim=16,
                                      pooled_projection_dim=P, pos_embed_max_size=16)
    no_pooled.register_to_config(pooled_projection_dim=None)  # a transformer without the pooled conditioning
    with pytest.raises(ValueError, match="pooled_projection_dim missing.*SD3Transformer2DModel"):
        require_sd3_conditioning(dict(no_pooled.config), type(no_pooled).__name__)
    with pytest.raises(ValueError, match="does not fit the transformer"):
        FlowDenoiser(transformer, dict(scheduler.config), PackedText(L, D, P + 1))
