"""The comparison's baselines run a few steps on the tiny config and do what they claim (issue 7)."""

from __future__ import annotations

import copy

import pytest
import torch

from sfd_fast.baselines.finetune import FinetuneConfig, FinetuneUnlearner
from sfd_fast.baselines.robust_sfd import RobustConfig, inner_attack, robust_sfd_step
from sfd_fast.baselines.sid import AllClasses, plain_sid_config, plain_sid_state
from sfd_fast.core.config import SFDConfig
from sfd_fast.core.forget import ForgetSpec
from sfd_fast.core.losses import sfd_sample_weights
from sfd_fast.core.state import SFDState
from sfd_fast.core.step import train_step

TINY = SFDConfig(batch_size=2, forget_batch_size=2, lr_gen=1e-3, lr_fake=1e-3)
SPEC = ForgetSpec(10, (0,), (1,))


def _finite(metrics: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in metrics.values())


def test_plain_sid_weighs_every_sample_alike_and_never_remaps_labels(tiny_teacher):
    cfg = plain_sid_config(SFDConfig(batch_size=6, forget_batch_size=2))
    weights = sfd_sample_weights(6, 2, cfg.lambda_g, cfg.gen_loss_scale)
    torch.testing.assert_close(weights, torch.full((8,), cfg.gen_loss_scale / 6))
    cond = AllClasses(10).sample_conditions(200, 56, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(cond.teacher, cond.generator) and set(cond.generator.tolist()) == set(range(10))
    state = plain_sid_state(TINY, tiny_teacher)
    before = copy.deepcopy(state.generator.state_dict())
    assert _finite(train_step(state))
    assert any(not torch.equal(before[k], v) for k, v in state.generator.state_dict().items())


def test_robust_sfd_inner_attack_moves_the_condition_and_the_step_trains_the_forget_row(tiny_teacher):
    state = SFDState.create(TINY, tiny_teacher)
    labels_f, labels_o = torch.tensor([0, 0]), torch.tensor([1, 1])
    z = torch.randn(2, *state.image_shape)
    delta = inner_attack(state, labels_f, labels_o, z, RobustConfig(inner_steps=2))
    assert delta.shape == (2, state.generator.denoiser.unet.class_embedding.weight.shape[1])
    assert bool(torch.isfinite(delta).all()) and float(delta.abs().max()) > 0
    assert all(p.grad is None for p in state.generator.parameters())  # the attack leaves G untouched
    row_before = state.generator.denoiser.unet.class_embedding.weight[0].detach().clone()
    metrics = robust_sfd_step(state, RobustConfig(inner_steps=1))
    assert _finite(metrics) and {"loss_gen_adv", "loss_fake_adv", "delta_norm"} <= set(metrics)
    assert not torch.equal(row_before, state.generator.denoiser.unet.class_embedding.weight[0])
    with pytest.raises(ValueError, match="inner_steps >= 1"):
        RobustConfig(inner_steps=0)


@pytest.mark.parametrize("method", ["esd", "retain_distill", "advunlearn"])
def test_finetune_baselines_take_finite_steps(tiny_teacher, method):
    run = FinetuneUnlearner(tiny_teacher, SPEC, FinetuneConfig(method=method, batch_size=2, retain_batch_size=2,
                                                                trajectory_steps=3, inner_steps=1))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    metrics = run.step()
    assert _finite(metrics)
    changed = {k for k, v in run.model.state_dict().items() if not torch.equal(before[k], v)}
    if method == "advunlearn":  # only the class-embedding table trains, and only the forget row of it
        assert changed == {"unet.class_embedding.weight"}
        rows = (before["unet.class_embedding.weight"] != run.model.unet.class_embedding.weight).any(1)
        assert rows.nonzero().flatten().tolist() == [0]
    else:
        assert len(changed) > 1
    # The copy equals the original at step 0, so the retain term only shows from the second step on;
    # for advunlearn it stays 0: table rows are independent, the remaining rows never move.
    assert abs(float(metrics["loss_retain"])) < 1e-9  # bit-exact only single-threaded (reduction order)
    assert (float(run.step()["loss_retain"]) > 1e-6) == (method == "retain_distill")  # else float noise only


def test_esd_null_is_the_mean_of_the_class_conditional_denoisers(tiny_teacher):
    run = FinetuneUnlearner(tiny_teacher, SPEC, FinetuneConfig(eta=0.0))
    x = torch.randn(3, *tiny_teacher.image_shape)
    sigma = torch.full((3,), 1.5)
    with torch.no_grad():
        mean = torch.stack([tiny_teacher(x, sigma, torch.full((3,), k)) for k in range(10)]).mean(0)
    torch.testing.assert_close(run.esd_target(x, sigma, torch.tensor([0, 0, 0])), mean, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown fine-tuning method 'ga'"):
        FinetuneConfig(method="ga")


def test_advunlearn_default_lr_moves_its_embedding_row_where_1e4_did_not(tiny_teacher):
    """Issue 15: at lr 1e-4 AdvUnlearn's one trainable row moved 0.1% of its norm (a no-op row in
    the table); the per-method default (1e-2) must move it by a sizeable fraction."""
    assert FinetuneConfig(method="advunlearn").learning_rate == 1e-2
    assert FinetuneConfig(method="esd").learning_rate == 1e-4 == FinetuneConfig(method="retain_distill").learning_rate
    moved = {}
    for lr in (None, 1e-4):
        torch.manual_seed(0)
        run = FinetuneUnlearner(tiny_teacher, SPEC, FinetuneConfig(method="advunlearn", lr=lr, batch_size=2,
                                                                    retain_batch_size=2, trajectory_steps=3,
                                                                    inner_steps=1))
        row = run.model.unet.class_embedding.weight[0].detach().clone()
        for _ in range(10):
            run.step()
        moved[lr] = float((run.model.unet.class_embedding.weight[0].detach() - row).norm() / row.norm())
    assert moved[None] > 0.02 and moved[1e-4] < 0.002, moved
    with pytest.raises(ValueError, match="lr must be > 0 or None"):
        FinetuneConfig(lr=0.0)
