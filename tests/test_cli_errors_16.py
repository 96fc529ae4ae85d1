"""Issue 16 items 3-5: bad inputs to evaluate / distill / export / serve are one-line errors with exit code 2
and nothing on disk; distill's help and options; a quiet CLI (no accelerate notice) and --version."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sfd_fast import EDMDenoiser, OneStepGenerator, UNetConfig, build_unet, save_denoiser
from sfd_fast.cli.main import main
from sfd_fast.eval.classifier import DigitClassifier
from sfd_fast.models.networks import save_generator

RGB = UNetConfig(resolution=8, channels=3, block_out_channels=(16, 32), attention_levels=(False, True),
                 attention_head_dim=16)


def _one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def rgb_generator(tmp_path_factory):
    """A 3x8x8 class-conditional generator: not the embedded classifier's 1x16x16 digits."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rgb") / "generator"
    save_generator(OneStepGenerator(EDMDenoiser(build_unet(RGB))), path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    teacher = EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).eval()
    save_denoiser(teacher, root / "teacher")
    save_generator(OneStepGenerator(teacher), root / "generator")
    return root


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra")
    from sfd_fast.models.latent_denoiser import LatentDenoiser
    from sfd_fast.models.sd_pipeline import load_t2i_pipeline
    from sfd_fast.models.tiny_sd import build_tiny_pipeline
    from sfd_fast.train.text_to_image import save_t2i_generator

    root = tmp_path_factory.mktemp("sd")
    pipe_dir = build_tiny_pipeline(root / "pipe")
    pipe = load_t2i_pipeline(pipe_dir)
    save_t2i_generator(OneStepGenerator(LatentDenoiser(pipe.unet, pipe.scheduler_config), 2.5), pipe_dir,
                       root / "run" / "generator")
    return root


# ------------------------------------------------------------------ evaluate (item 3)

def test_evaluate_rgb_generator_with_the_digit_classifier_is_refused(rgb_generator, tmp_path, capsys):
    code = main(["evaluate", "--generator", str(rgb_generator), "--out", str(tmp_path / "eval"), "--per-class", "1",
                 "--no-progress"])
    assert code == 2
    _one_error_line(capsys, "3x8x8", "1x16x16", "--classifier")
    assert not (tmp_path / "eval").exists()


def test_evaluate_takes_a_user_classifier_built_for_the_shape(rgb_generator, tmp_path, capsys):
    torch.manual_seed(0)
    DigitClassifier(channels=3, num_classes=10, resolution=8).save(tmp_path / "rgb.safetensors")
    assert (tmp_path / "rgb.json").is_file()  # the config beside the weights
    code = main(["evaluate", "--generator", str(rgb_generator), "--classifier", str(tmp_path / "rgb.safetensors"),
                 "--out", str(tmp_path / "eval"), "--per-class", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_evaluate_user_classifier_json_config_is_read_and_checked(rgb_generator, tmp_path, capsys):
    import json

    torch.manual_seed(0)
    DigitClassifier(channels=3, num_classes=10, resolution=8).save(tmp_path / "rgb.safetensors")
    (tmp_path / "rgb.json").write_text(json.dumps({"channels": 3, "num_classes": 10, "feature_dim": 128,
                                                   "resolution": 32}))  # edited: built for 32x32
    args = ["evaluate", "--generator", str(rgb_generator), "--classifier", str(tmp_path / "rgb.safetensors"),
            "--out", str(tmp_path / "eval"), "--per-class", "1", "--no-progress"]
    assert main(args) == 2
    _one_error_line(capsys, "3x8x8", "3x32x32")
    (tmp_path / "rgb.json").write_text(json.dumps({"channels": 3, "num_classes": 10, "feature_dim": 64}))
    assert main(args) == 2
    _one_error_line(capsys, "do not fit", "rgb.safetensors")
    (tmp_path / "rgb.json").write_text(json.dumps({"channels": "three", "num_classes": 10, "feature_dim": 128}))
    assert main(args) == 2
    _one_error_line(capsys, "'channels'", "'three'", "positive integer")
    assert not (tmp_path / "eval").exists()


def test_evaluate_classifier_with_other_classes_is_refused(tiny_dirs, tmp_path, capsys):
    DigitClassifier(channels=1, num_classes=5, resolution=8).save(tmp_path / "five.safetensors")
    code = main(["evaluate", "--generator", str(tiny_dirs / "generator"), "--classifier",
                 str(tmp_path / "five.safetensors"), "--out", str(tmp_path / "eval"), "--per-class", "1"])
    assert code == 2
    _one_error_line(capsys, "predicts 5 classes", "has 10")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("argv,needles", [
    (["--per-class", "0"], ["--per-class", ">= 1", "0"]),
    (["--teacher-steps", "0"], ["--teacher-steps", "0"]),
    (["--classifier", "clf.pt"], ["--classifier", ".safetensors", "clf.pt"]),
])
def test_evaluate_bad_numbers_and_files(tiny_dirs, tmp_path, capsys, argv, needles):
    code = main(["evaluate", "--teacher", str(tiny_dirs / "teacher"), "--out", str(tmp_path / "eval"), *argv])
    assert code == 2
    _one_error_line(capsys, *needles)
    assert not (tmp_path / "eval").exists()


def test_evaluate_t2i_generator_points_to_evaluate_t2i(sd_dirs, tmp_path, capsys):
    code = main(["evaluate", "--generator", str(sd_dirs / "run" / "generator"), "--out", str(tmp_path / "eval")])
    assert code == 2
    err = _one_error_line(capsys, "evaluate-t2i", "text-to-image")
    assert "sfd-fast distill" not in err
    code = main(["evaluate", "--teacher", str(sd_dirs / "pipe"), "--out", str(tmp_path / "eval")])
    assert code == 2
    _one_error_line(capsys, "evaluate-t2i")
    assert not (tmp_path / "eval").exists()


# ------------------------------------------------------------------ distill (item 4)

def test_distill_sd_folder_as_teacher_says_use_pipeline(sd_dirs, tmp_path, capsys):
    code = main(["distill", "--teacher", str(sd_dirs / "pipe"), "--out", str(tmp_path / "out"), "--steps", "1"])
    assert code == 2
    err = _one_error_line(capsys, "--pipeline", str(sd_dirs / "pipe"))
    assert "cross_attention_dim" not in err
    assert not (tmp_path / "out").exists()


def test_distill_help_shows_teacher_or_pipeline(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--help"])
    assert exc.value.code == 0
    usage = " ".join(capsys.readouterr().out.split("\n\n")[0].split())
    assert "(--teacher DIR | --pipeline DIR)" in usage
    assert "--step-options" in usage and "--log-every" in usage


def test_distill_needs_teacher_or_pipeline(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--teacher" in capsys.readouterr().err


def test_distill_step_options_and_log_every(tiny_dirs, tmp_path):
    import json

    assert main(["distill", "--teacher", str(tiny_dirs / "teacher"), "--out", str(tmp_path / "run"), "--steps", "2",
                 "--step-options", "fused", "--log-every", "1", "--set", "batch_size=2",
                 "--set", "forget_batch_size=1", "--no-progress"]) == 0
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [e["step"] for e in log["log"]] == [1, 2] and log["step_options"] == "fused"


@pytest.mark.parametrize("argv,needles", [(["--log-every", "0"], ["--log-every", "0"]),
                                          (["--steps", "0"], ["--steps", "0"])])
def test_distill_bad_numbers(tiny_dirs, tmp_path, capsys, argv, needles):
    code = main(["distill", "--teacher", str(tiny_dirs / "teacher"), "--out", str(tmp_path / "out"), *argv])
    assert code == 2
    _one_error_line(capsys, *needles)
    assert not (tmp_path / "out").exists()


def test_distill_unknown_step_options_preset(tiny_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(tiny_dirs / "teacher"), "--out", str(tmp_path / "out"),
              "--step-options", "turbo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'turbo'" in err and "fused" in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ export / serve inputs

@pytest.mark.parametrize("argv,needles", [
    (["--out", "g.pt"], ["--out", ".onnx", "g.pt"]),
    (["--opset", "99"], ["opset", "[14, 20]", "99"]),
    (["--max-batch", "0"], ["--max-batch", "0"]),
])
def test_export_bad_inputs(tiny_dirs, tmp_path, capsys, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    args = ["export", "--generator", str(tiny_dirs / "generator"), "--out", "g.onnx", "--exporter", "torchscript"]
    code = main(args + argv)
    assert code == 2
    _one_error_line(capsys, *needles)
    assert list(tmp_path.iterdir()) == []


def test_export_missing_generator(tmp_path, capsys):
    assert main(["export", "--generator", str(tmp_path / "nope"), "--out", str(tmp_path / "g.onnx")]) == 2
    _one_error_line(capsys, "nope", "not a directory")
    assert list(tmp_path.iterdir()) == []


def test_serve_refuses_an_export_it_cannot_condition(tiny_dirs, tmp_path, capsys):
    """A G-only text-embedding export (no text encoder beside it): refused, naming what serve takes."""
    from sfd_fast.serve import to_onnx

    torch.manual_seed(0)
    g = OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))))
    to_onnx(g, tmp_path / "g.onnx", exporter="torchscript")
    import json

    meta = json.loads((tmp_path / "g.onnx.json").read_text())
    meta["num_classes"] = None  # what a to_onnx of a text-embedding generator writes
    (tmp_path / "g.onnx.json").write_text(json.dumps(meta))
    assert main(["serve", str(tmp_path / "g.onnx"), "--port", "0"]) == 2
    _one_error_line(capsys, "class-conditional", "text-to-image", "sfd-fast export")


def test_serve_bad_limits(tiny_dirs, tmp_path, capsys):
    from sfd_fast.serve import to_onnx

    torch.manual_seed(0)
    to_onnx(OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name("tiny")))), tmp_path / "g.onnx",
            exporter="torchscript")
    assert main(["serve", str(tmp_path / "g.onnx"), "--port", "0", "--max-count", "65"]) == 2
    _one_error_line(capsys, "max_count (65)", "max_batch (64)")
    # A process with a timeout: a server that accepted --queue-size 0 (an unbounded queue) would serve forever.
    out = subprocess.run([sys.executable, "-m", "sfd_fast.cli", "serve", str(tmp_path / "g.onnx"), "--port", "0",
                          "--queue-size", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "queue_size" in out.stderr, out.stderr


# ------------------------------------------------------------------ quiet (item 5)

def test_version():
    out = subprocess.run([sys.executable, "-m", "sfd_fast.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("sfd-fast ") and out.stdout.split()[1][0].isdigit()


def test_model_loading_commands_print_no_accelerate_notice(tiny_dirs, tmp_path):
    """diffusers' "Cannot initialize model with low cpu memory usage ... pip install accelerate" on every load."""
    DigitClassifier(channels=1, num_classes=10).save(tmp_path / "clf.safetensors")  # no resolution: any side
    clf = ["--classifier", str(tmp_path / "clf.safetensors")]
    runs = [["evaluate", "--teacher", str(tiny_dirs / "teacher"), "--out", str(tmp_path / "e1"), "--per-class", "1",
             "--teacher-steps", "2", "--no-progress", *clf],
            ["evaluate", "--generator", str(tiny_dirs / "generator"), "--out", str(tmp_path / "e2"), "--per-class", "1",
             "--no-progress", *clf]]
    for argv in runs:
        out = subprocess.run([sys.executable, "-m", "sfd_fast.cli", *argv], capture_output=True, text=True,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        assert "accelerate" not in out.stderr and "low cpu memory" not in out.stderr, out.stderr


def test_t2i_pipeline_load_prints_no_accelerate_notice(sd_dirs):
    code = ("from sfd_fast.train.text_to_image import load_t2i_generator; "
            f"load_t2i_generator({str(sd_dirs / 'run' / 'generator')!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "accelerate" not in out.stderr, out.stderr
