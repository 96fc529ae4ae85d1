"""The demo's plumbing end to end on the committed assets (a few steps; the real run is `sfd-fast demo`)."""

import json

import pytest

from sfd_fast.cli.demo import TEACHER_DIR, run_demo
from sfd_fast.core.config import SFDConfig
from sfd_fast.eval.classifier import CLASSIFIER_FILE, DigitClassifier
from sfd_fast.io.data import load_embedded_mnist

REQUIRED = {"forget_accuracy", "override_rate", "remain_accuracy", "teacher_remain_accuracy", "teacher_nfe",
            "steps", "seconds"}


def test_demo_writes_metrics_grids_and_generator(tmp_path):
    metrics = run_demo(tmp_path, steps=2, per_class=2, teacher_steps=2, progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert REQUIRED <= set(saved) and saved["steps"] == 2 and saved["teacher_nfe"] == 3
    assert metrics["forget_accuracy"] == saved["forget_accuracy"]
    assert saved["fid_features"] == "independent LeNet features" and saved["fid"] > 0 and saved["teacher_fid"] > 0
    assert saved["fid_ratio_to_teacher"] == saved["fid"] / saved["teacher_fid"]
    assert saved["config"] == json.loads(SFDConfig.from_name("quality").to_json())  # the demo's default preset
    for name in ("samples_generator.png", "samples_teacher.png", "generator/sfd_fast.json", "train_log.json"):
        assert (tmp_path / name).exists(), name


def test_demo_rejects_bad_forget_class_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="forget class 11 is out of range"):
        run_demo(tmp_path / "out", steps=1, forget=(11,), progress=False)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_demo_rejects_unknown_preset_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"unknown SFD preset 'fast'; known: \['demo', 'quality'"):
        run_demo(tmp_path / "out", steps=1, preset="fast", progress=False)
    assert not (tmp_path / "out").exists()


def test_committed_assets_load_and_classifier_is_accurate():
    assert (TEACHER_DIR / "sfd_fast.json").exists()
    clf = DigitClassifier.load(CLASSIFIER_FILE)
    x, y = load_embedded_mnist("test")
    assert (clf.predict(x) == y).float().mean() > 0.95  # measured 0.976 when it was trained


@pytest.mark.slow
def test_full_demo_meets_acceptance(tmp_path):
    """The README's demo, as shipped (~5 min on 2 CPU cores): forgetting worked and remain quality held."""
    metrics = run_demo(tmp_path, progress=False)
    assert metrics["forget_accuracy"] <= 0.05 and metrics["override_rate"] >= 0.80
    assert metrics["remain_accuracy"] >= metrics["teacher_remain_accuracy"] - 0.10
