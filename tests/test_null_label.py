"""A null label in the teacher (label dropout; issue 15): trains, saves, loads, guides, and ESD uses it.
Old teacher folders (no null label) still load as before."""

from __future__ import annotations

import json

import pytest
import torch

from sfd_fast.baselines.finetune import FinetuneConfig, FinetuneUnlearner
from sfd_fast.core.forget import ForgetSpec
from sfd_fast.io.atomic import CheckpointError
from sfd_fast.io.data import ASSETS
from sfd_fast.models.networks import OneStepGenerator, load_denoiser, load_generator, save_denoiser, save_generator
from sfd_fast.models.sampler import GuidedDenoiser
from sfd_fast.models.unet import UNetConfig
from sfd_fast.train.pretrain import pretrain_teacher, with_null_row

SPEC = ForgetSpec(10, (0,), (1,))


@pytest.fixture
def null_teacher(tiny_teacher):
    torch.manual_seed(0)
    return with_null_row(tiny_teacher).eval()


def _inputs(teacher, n=3):
    torch.manual_seed(1)
    return torch.randn(n, *teacher.image_shape), torch.full((n,), 1.3), torch.tensor([0, 4, 9][:n])


def test_label_dropout_pretraining_gives_a_null_label_teacher_that_round_trips(tmp_path):
    config = UNetConfig.from_name("tiny")
    images = torch.rand(16, config.channels, config.resolution, config.resolution) * 2 - 1
    labels = torch.arange(16) % 10
    teacher = pretrain_teacher(images, labels, config, steps=2, batch_size=4, label_dropout=0.5, progress=False)
    assert teacher.null_label == 10 and teacher.num_classes == 10
    assert teacher.unet.config.num_class_embeds == 11
    save_denoiser(teacher, tmp_path / "t")
    assert json.loads((tmp_path / "t" / "sfd_fast.json").read_text())["null_label"] == 10
    loaded = load_denoiser(tmp_path / "t")
    assert loaded.null_label == 10 and loaded.num_classes == 10
    x, s, _ = _inputs(teacher)
    null = torch.full((3,), 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, s, null), teacher(x, s, null), rtol=0, atol=0)
    from diffusers import UNet2DModel  # a stock diffusers folder: the null label is class index 10

    assert UNet2DModel.from_pretrained(tmp_path / "t").config.num_class_embeds == 11
    with pytest.raises(ValueError, match="label_dropout must be in"):
        pretrain_teacher(images, labels, config, steps=1, batch_size=4, label_dropout=1.0, progress=False)


def test_null_row_only_training_moves_the_null_output_and_leaves_every_class_output_bitwise(tiny_teacher):
    config = UNetConfig.from_name("tiny")
    images = torch.rand(16, config.channels, config.resolution, config.resolution) * 2 - 1
    labels = torch.arange(16) % 10
    teacher = pretrain_teacher(images, labels, config, steps=3, batch_size=4, lr=1e-2, init=tiny_teacher,
                               null_row_only=True, progress=False).eval()
    start = with_null_row(tiny_teacher).eval()  # the null row as it starts: the mean class row
    assert teacher.null_label == 10
    table, table0 = teacher.unet.class_embedding.weight, start.unet.class_embedding.weight
    torch.testing.assert_close(table[:10], table0[:10], rtol=0, atol=0)
    assert not torch.equal(table[10], table0[10])
    for (name, p), p0 in zip(teacher.named_parameters(), start.parameters()):
        if "class_embedding" not in name:
            assert torch.equal(p, p0), name
    x, s, c = _inputs(teacher)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, s, c), start(x, s, c), rtol=0, atol=0)
        null = torch.full((3,), 10)
        assert not torch.allclose(teacher(x, s, null), start(x, s, null))
    with pytest.raises(ValueError, match="null_row_only trains the null row of an init teacher"):
        pretrain_teacher(images, labels, config, steps=1, batch_size=4, null_row_only=True, progress=False)


def test_embedded_teacher_has_a_null_label():
    embedded = load_denoiser(ASSETS / "teacher")
    assert embedded.null_label == 10 and embedded.num_classes == 10
    assert embedded.unet.class_embedding.weight.shape[0] == 11


def test_old_teacher_folders_load_without_a_null_label(tmp_path, tiny_teacher):
    save_denoiser(tiny_teacher, tmp_path / "old")
    assert "null_label" not in json.loads((tmp_path / "old" / "sfd_fast.json").read_text())
    assert load_denoiser(tmp_path / "old").null_label is None
    meta = tmp_path / "old" / "sfd_fast.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "null_label": 3}))
    with pytest.raises(CheckpointError, match=r"null_label must be the last class-embedding row \(9"):
        load_denoiser(tmp_path / "old")


def test_growing_a_null_row_leaves_every_class_output_unchanged(tiny_teacher, null_teacher):
    x, s, c = _inputs(tiny_teacher)
    with torch.no_grad():
        torch.testing.assert_close(null_teacher(x, s, c), tiny_teacher(x, s, c), rtol=0, atol=0)
    table = null_teacher.unet.class_embedding.weight
    torch.testing.assert_close(table[10], table[:10].mean(0))


def test_guidance_scale_one_is_the_conditional_teacher_and_zero_the_unconditional(null_teacher, tiny_teacher):
    x, s, c = _inputs(null_teacher)
    with torch.no_grad():
        null = null_teacher(x, s, torch.full_like(c, 10))
        cond = null_teacher(x, s, c)
        torch.testing.assert_close(GuidedDenoiser(null_teacher, 1.0)(x, s, c), cond, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(GuidedDenoiser(null_teacher, 0.0)(x, s, c), null, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(GuidedDenoiser(null_teacher, 3.0)(x, s, c), null + 3 * (cond - null),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs a teacher with a null label"):
        GuidedDenoiser(tiny_teacher, 2.0)


def test_esd_uses_the_true_null_when_the_teacher_has_one(null_teacher, tiny_teacher):
    x, s, _ = _inputs(null_teacher)
    c_f = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        target = FinetuneUnlearner(null_teacher, SPEC, FinetuneConfig(eta=0.0)).esd_target(x, s, c_f)
        torch.testing.assert_close(target, null_teacher(x, s, torch.full((3,), 10)), rtol=1e-5, atol=1e-6)
        # Without a null label: the mean of the 10 class-conditional outputs (the documented fallback).
        mean = torch.stack([tiny_teacher(x, s, torch.full((3,), k)) for k in range(10)]).mean(0)
        fallback = FinetuneUnlearner(tiny_teacher, SPEC, FinetuneConfig(eta=0.0)).esd_target(x, s, c_f)
        torch.testing.assert_close(fallback, mean, rtol=1e-5, atol=1e-6)


def test_a_generator_from_a_null_label_teacher_saves_the_real_classes_only(tmp_path, null_teacher):
    g = OneStepGenerator(null_teacher, 2.5).eval()
    save_generator(g, tmp_path / "g")
    assert json.loads((tmp_path / "g" / "unet" / "config.json").read_text())["num_class_embeds"] == 10
    loaded = load_generator(tmp_path / "g")
    z, _, c = _inputs(null_teacher)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, c), g(z, c), rtol=0, atol=0)
    assert g.denoiser.unet.config.num_class_embeds == 11  # the in-memory generator is left as it was


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resizing_the_class_table_keeps_dtype_rows_and_every_other_weight(tiny_teacher, dtype):
    import copy

    from sfd_fast.models.unet import resize_class_table

    unet = copy.deepcopy(tiny_teacher.unet).to(dtype)
    grown = resize_class_table(unet, 11, extra_row=torch.ones(unet.class_embedding.weight.shape[1]))
    shrunk = resize_class_table(grown, 10)
    assert grown.dtype == shrunk.dtype == dtype and grown.class_embedding.weight.shape[0] == 11
    torch.testing.assert_close(grown.class_embedding.weight[10], torch.ones_like(grown.class_embedding.weight[10]))
    for name, value in unet.state_dict().items():
        torch.testing.assert_close(shrunk.state_dict()[name], value, rtol=0, atol=0)
