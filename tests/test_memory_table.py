"""scripts/memory_table.py: its per-parameter arithmetic against a real SFD state's tensors, and its
meta-device activation counter against a real CPU forward (docs/memory.md is built from both)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sfd_fast import train_step
from sfd_fast.core.prompts import ConceptSpec
from sfd_fast.models.published_configs import PUBLISHED_MODELS
from sfd_fast.models.sd_pipeline import load_t2i_pipeline
from sfd_fast.models.tiny_sd import build_tiny_pipeline
from sfd_fast.train.text_to_image import T2I_SFD_CONFIG, T2IOptions, build_t2i_state

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "memory_table.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("memory_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_table"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


mt = _load_script()
MODES = {m.name: m for m in mt.MODES}
SPEC = ConceptSpec.from_substitution("brad pitt", "a man", ["a cat"], templates=("{}",))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("mem") / "pipe")


def _data_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (by data pointer: real tensors only)."""
    seen = {}
    for t in tensors:
        if t is not None and t.dim() > 0:  # 0-d: Adam's step counters, not priced by the formula
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _state_tensors(state):
    """Every tensor the state keeps for its four copies of the network: weights, grads, buffers,
    optimizer moments, masters and their grads (the denoiser wrappers' own small tables excluded)."""
    nets = [state.teacher.network, state.fake.network, state.generator.denoiser.network,
            state.generator_ema.denoiser.network]
    out = []
    for net in nets:
        for p in net.parameters():
            out += [p, p.grad]
        out += list(net.buffers())
    for opt in (state.opt_fake, state.opt_gen):
        for group in opt.param_groups:
            for p in group["params"]:
                out += [p, p.grad, *(v for v in opt.state[p].values() if torch.is_tensor(v))]
    return out


@pytest.mark.parametrize("mode_name", ["fp32", "bf16 + fp32 masters"])
def test_state_formula_equals_a_real_state_after_one_step(pipeline_dir, mode_name):
    """P x bytes-per-param (+ buffers) from a meta-device copy == the bytes a real state holds after a step."""
    mode = MODES[mode_name]
    options = T2IOptions(teacher_precision="bf16" if mode.teacher == 2 else "fp32",
                         trained_precision="bf16" if mode.weight == 2 else "fp32")
    pipe = load_t2i_pipeline(pipeline_dir)
    with torch.device("meta"):
        meta_unet = type(pipe.unet).from_config(pipe.unet.config)
    params = sum(p.numel() for p in meta_unet.parameters())
    buffers = sum(b.numel() for b in meta_unet.buffers())
    torch.manual_seed(0)
    state = build_t2i_state(pipe, SPEC, T2I_SFD_CONFIG.replace(batch_size=1, forget_batch_size=1), options)
    train_step(state)  # creates the gradients, Adam moments and (masters mode) the masters' fp32 grads
    assert _data_bytes(_state_tensors(state)) == mt.state_bytes(mode, params, buffers)
    assert params == sum(p.numel() for p in state.fake.network.parameters())


def test_state_formula_prices_what_it_claims():
    # The table's headline numbers, by hand: 40 / 38 / 38 bytes per parameter, DDP adds 2 gradient copies.
    assert [m.per_param for m in mt.MODES] == [40, 38, 38, 38]
    m = MODES["bf16 + fp32 masters"]
    assert mt.state_bytes(m, 10, 0, ddp=True) - mt.state_bytes(m, 10, 0) == 2 * 10 * 2
    units = mt.Units(largest=3, root=2)
    f = mt.fsdp_state_bytes(m, 100, 0, units, world=4, shard_teacher=False)
    assert f["state"] == 100 * 2 + (2 * 100 * 16 + 100 * 4) // 4
    assert f["working_set"] == 2 * 2 * 2 + 2 * 3 * 2 + (3 + 2) * 6


TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def _tiny_unet(device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DConditionModel(**TINY_UNET)


def _inputs(device, batch=2):
    g = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(batch, 4, 16, 16, generator=g).to(device), "timestep": torch.full((batch,), 500.0).to(device),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g).to(device)}


def _data_ptr(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("trained", [True, False])
def test_meta_activation_count_equals_a_real_cpu_forward(trained):
    """Saved-for-backward bytes of a real CPU forward (torch's own CPU flash-attention kernel, storages told
    apart by data pointer) == the same forward on meta tensors with attention routed to that kernel's op."""
    real = mt.measure_forward(_tiny_unet("cpu"), _inputs("cpu"), trained, fused_attention=False, key=_data_ptr)
    meta = mt.measure_forward(_tiny_unet("meta"), _inputs("meta"), trained)
    assert real.saved > 0 and meta.saved == real.saved
    assert meta.raw == real.raw and meta.saves == real.saves
    # Without the routing, meta tensors take SDPA's math path and keep the L x L attention matrices.
    assert mt.measure_forward(_tiny_unet("meta"), _inputs("meta"), trained, fused_attention=False).saved > meta.saved
    # The frozen (input-gradient) forward keeps less than the weight-gradient one.
    if not trained:
        assert meta.saved < mt.measure_forward(_tiny_unet("meta"), _inputs("meta"), True).saved


def test_checkpointed_count_agrees_on_cpu_and_meta_and_is_smaller():
    real = mt.measure_forward(_tiny_unet("cpu"), _inputs("cpu"), True, checkpointing=True, fused_attention=False,
                              key=_data_ptr)
    meta = mt.measure_forward(_tiny_unet("meta"), _inputs("meta"), True, checkpointing=True)
    plain = mt.measure_forward(_tiny_unet("meta"), _inputs("meta"), True)
    assert (meta.saved, meta.largest_block) == (real.saved, real.largest_block)
    assert 0 < meta.largest_block < plain.saved and meta.saved + meta.largest_block < plain.saved


def test_activations_scale_with_the_batch():
    one = mt.measure_forward(_tiny_unet("meta"), _inputs("meta", batch=1), True).saved
    four = mt.measure_forward(_tiny_unet("meta"), _inputs("meta", batch=4), True).saved
    assert four == pytest.approx(4 * one, rel=0.02)


# Exact counts of the published architectures (diffusers 0.42 constructors): a typo in a config changes them.
MEASURED = {"sd15": 859_520_964, "sdxl": 2_567_463_684, "sd3-medium": 2_028_328_000,
            "sd3.5-large": 8_056_627_520, "pixart-sigma": 610_856_096}


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_published_configs_build_on_meta_with_their_published_sizes(name):
    model = PUBLISHED_MODELS[name]
    net = model.build_denoiser("meta")
    n = sum(p.numel() for p in net.parameters())
    assert n == MEASURED[name]
    assert abs(n - model.published_params) / model.published_params < 0.04  # 860M, 2.6B, 2B, 8B, 0.6B
    assert all(p.is_meta for p in net.parameters())


def test_script_help_runs():
    with pytest.raises(SystemExit) as exit_info:
        mt.main(["--help"])
    assert exit_info.value.code == 0
