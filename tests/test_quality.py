"""The independent FID network, the quality metrics and the FID-vs-steps curve (issue 15)."""

from __future__ import annotations

import io
import os
import stat

import pytest
import torch
from PIL import Image

from sfd_fast.core.config import SFDConfig
from sfd_fast.core.forget import ForgetSpec
from sfd_fast.eval.classifier import DigitClassifier
from sfd_fast.eval.fid import ClassifierFeatures
from sfd_fast.eval.curve import CurveConfig, run_curve
from sfd_fast.eval.fid_network import FID_NETWORK_NAME, LeNetFeatures, independent_features
from sfd_fast.eval.quality import quality_metrics, real_class_variance
from sfd_fast.eval.report import line_chart
from sfd_fast.io.atomic import CheckpointError, atomic_write_bytes, save_tensors, staging_dir
from sfd_fast.io.data import load_embedded_mnist

SPEC = ForgetSpec(10, (0,), (1,))


def test_embedded_fid_network_is_a_different_network_that_reads_digits():
    lenet = LeNetFeatures.load()
    digit = DigitClassifier.load()
    assert {type(m) for m in lenet.body} != {type(m) for m in digit.body}  # another design, not a re-seed
    images, labels = load_embedded_mnist("test", 16)
    accuracy = (lenet.predict(images) == labels).float().mean().item()
    assert accuracy > 0.95, f"the embedded FID network scores {accuracy:.3f} on held-out digits"
    features = independent_features()
    assert features.name == FID_NETWORK_NAME and features(images[:7]).shape == (7, 256)


def test_fid_network_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    net = LeNetFeatures(resolution=8, feature_dim=16).eval()
    net.save(tmp_path / "f.safetensors")
    loaded = LeNetFeatures.load(tmp_path / "f.safetensors")
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded.features(x), net.features(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="trained on 8x8 images"):
        loaded.features(torch.zeros(1, 1, 16, 16))
    save_tensors(net.state_dict(), tmp_path / "other.safetensors", {"kind": "digit_classifier"})
    with pytest.raises(CheckpointError, match="not a LeNet FID network"):
        LeNetFeatures.load(tmp_path / "other.safetensors")


def test_a_collapsed_sampler_has_less_class_variance_than_real_digits():
    features = independent_features()
    images, labels = load_embedded_mnist("test", 16)
    prototypes = torch.stack([images[labels == k][0] for k in range(10)])

    def collapsed(z, c):  # one image per class whatever the noise: the failure per-class variance exposes
        return prototypes[c]

    def real(z, c):  # a different real digit of class c per sample
        picks = [images[labels == int(k)][i % 150 + 1] for i, k in enumerate(c.tolist())]
        return torch.stack(picks)

    out_collapsed = quality_metrics(collapsed, SPEC, (1, 16, 16), {"f": features}, images, labels, per_class=20)["f"]
    out_real = quality_metrics(real, SPEC, (1, 16, 16), {"f": features}, images, labels, per_class=20)["f"]
    assert out_collapsed["mean_class_variance"] == pytest.approx(0.0, abs=1e-6)
    real_var = real_class_variance(features, images, labels)
    assert out_real["mean_class_variance"] > 0.3 * sum(real_var[str(k)] for k in SPEC.remain) / 9
    assert out_real["fid"] < out_collapsed["fid"]
    assert set(out_real["class_variance"]) == {str(k) for k in SPEC.remain} and set(out_real["forget_variance"]) == {"0"}


def test_curve_runs_both_methods_from_the_same_initial_generator(tiny_teacher):
    torch.manual_seed(0)
    images, labels = load_embedded_mnist("test", 8)
    train = load_embedded_mnist("train", 8)
    classifier = DigitClassifier(resolution=8).eval()
    independent = ClassifierFeatures(LeNetFeatures(resolution=8).eval(), name="test lenet")
    cfg = CurveConfig(sfd=SFDConfig.from_name("demo").replace(batch_size=4, forget_batch_size=2), steps=2,
                      eval_at=(0, 2), per_class=4, teacher_steps=1)
    result = run_curve(tiny_teacher, classifier, independent, (images[:400], labels[:400]),
                       (train[0][:400], train[1][:400]), cfg)
    sfd, sid = (result["methods"][m]["points"] for m in ("sfd", "sid"))
    assert [p["step"] for p in sfd] == [0, 2] == [p["step"] for p in sid]
    assert sfd[0]["independent"]["fid"] == sid[0]["independent"]["fid"]  # same G before training
    assert sfd[1]["independent"]["fid"] != sid[1]["independent"]["fid"]  # SFD forgets, SiD does not
    assert result["teacher"]["independent"]["fid_features"] == "test lenet"
    assert result["floor_real_train_vs_test"]["classifier"]["fid"] > 0
    with pytest.raises(ValueError, match="eval_at"):
        CurveConfig(sfd=SFDConfig(), steps=2, eval_at=(3,))


def test_line_chart_is_a_png():
    png = line_chart({"a": [(0, 100.0), (10, 5.0)], "b": [(0, 100.0), (10, 8.0)]}, {"teacher": 3.0}, "t", "steps")
    assert Image.open(io.BytesIO(png)).size == (640, 400)


def test_written_files_and_folders_get_the_umask_mode_not_mkstemp_s(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "f.json", b"{}")
    folder = staging_dir(tmp_path / "model")
    # what open()/mkdir give (0644/0755 under the usual 022), not mkstemp's 0600 / mkdtemp's 0700
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask


def test_a_saved_model_folder_is_readable_like_any_file_the_user_writes(tmp_path, tiny_teacher):
    """diffusers' save_pretrained (safetensors >= 0.8) writes its weights 0600; the published
    folder's files get open()'s mode, as every other file we write."""
    from sfd_fast.models.networks import save_denoiser

    mask = os.umask(0)
    os.umask(mask)
    save_denoiser(tiny_teacher, tmp_path / "teacher")
    files = [f for f in (tmp_path / "teacher").rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o666 & ~mask for f in files}
