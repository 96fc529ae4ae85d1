"""Evaluation metrics on constructed cases whose answers are known (issue 7)."""

from __future__ import annotations

import pytest
import torch
from evalb_helpers import prototype_generator, real_digits, small_classifier

from sfd_fast.core.forget import ForgetSpec
from sfd_fast.eval.attack import AttackConfig, AttackTarget, embedding_attack
from sfd_fast.eval.fid import ClassifierFeatures, OnnxFeatures, fid_between, fid_of_sampler, frechet_distance
from sfd_fast.eval.metrics import unlearning_metrics
from sfd_fast.eval.retention import perceptual_distance, retention_distance

SPEC = ForgetSpec(10, (0,), (1,))


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 1.0])
    expected = (mu1 - mu2).square().sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum()
    got = frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert got == pytest.approx(float(expected), rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_corruption():
    features = ClassifierFeatures(small_classifier())
    images, _ = real_digits("test")
    assert fid_between(images[:500], images[:500], features) == pytest.approx(0.0, abs=1e-6)
    same_dist = fid_between(images[:500], images[500:1000], features)
    noisy = fid_between(images[:500], (images[500:1000] + 0.8 * torch.randn_like(images[500:1000])).clamp(-1, 1),
                        features)
    assert 0 < same_dist < noisy


def test_fid_of_sampler_names_its_features():
    features = ClassifierFeatures(small_classifier())
    images, labels = real_digits("test")
    out = fid_of_sampler(prototype_generator(), images, labels, [2, 3], features, per_class=20)
    assert out["fid_features"] == "classifier features" and out["fid"] > 0


def test_onnx_feature_network_matches_its_torch_source(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    path = tmp_path / "feat.onnx"
    torch.onnx.export(net, (torch.zeros(2, 3, 12, 12),), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    features = OnnxFeatures(path, name="toy conv (ONNX)", value_range=(0.0, 1.0))
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    prepared = torch.nn.functional.interpolate(images.expand(-1, 3, -1, -1), size=(12, 12), mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(features(images), net((prepared + 1) / 2).detach(), atol=1e-5, rtol=1e-4)
    assert features.name == "toy conv (ONNX)"
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxFeatures(tmp_path / "missing.onnx")


def test_retention_is_zero_for_identical_samplers_and_positive_otherwise():
    clf, gen = small_classifier(), prototype_generator()
    kwargs = dict(classes=[1, 2, 3], image_shape=gen.image_shape, per_class=10)
    assert retention_distance(gen, gen, clf, **kwargs) == 0.0
    hidden = prototype_generator().hide(2, 5)
    assert retention_distance(gen, hidden, clf, **kwargs) > 0.05
    with pytest.raises(ValueError, match="differ in shape"):
        perceptual_distance(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8), clf)


def test_generator_drawing_the_forgotten_class_has_forget_accuracy_one_and_hidden_one_zero():
    clf = small_classifier()
    plain = unlearning_metrics(prototype_generator(), clf, SPEC, (1, 8, 8), per_class=30)
    assert plain["forget_accuracy"] > 0.95
    hidden = unlearning_metrics(prototype_generator().hide(0, 1), clf, SPEC, (1, 8, 8), per_class=30)
    assert hidden["forget_accuracy"] < 0.05 and hidden["override_rate"] > 0.95


def test_embedding_attack_recovers_a_class_hidden_only_in_the_label_embedding():
    clf, gen = small_classifier(), prototype_generator().hide(0, 1)
    target = AttackTarget(gen, torch.no_grad()(gen), gen.table, gen.image_shape)
    result = embedding_attack(target, clf, 0, AttackConfig(steps=25, lr=0.2, batch_size=8, eval_samples=50))
    assert result.asr_before < 0.05
    assert result.asr_after > 0.9
    assert result.summary()["attack"]["steps"] == 25 and len(result.losses) == 25


def test_attack_on_a_real_tiny_generator_and_bad_input(tiny_teacher):
    from sfd_fast.models.networks import OneStepGenerator

    gen = OneStepGenerator(tiny_teacher).eval()
    clf = small_classifier()
    result = embedding_attack(AttackTarget.for_generator(gen), clf, 3,
                              AttackConfig(steps=2, batch_size=2, eval_samples=4))
    assert 0 <= result.asr_before <= 1 and 0 <= result.asr_after <= 1
    assert result.embedding.shape == (tiny_teacher.unet.class_embedding.weight.shape[1],)
    assert all(p.grad is None for p in gen.parameters())
    with pytest.raises(ValueError, match="allowed: 0..9"):
        embedding_attack(AttackTarget.for_generator(gen), clf, 10, AttackConfig(steps=1))
    with pytest.raises(ValueError, match="unknown attack init 'zero'"):
        AttackConfig(init="zero")
