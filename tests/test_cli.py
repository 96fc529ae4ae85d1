"""The sfd-fast CLI: every subcommand documents its options; bad input is a clear error."""

import subprocess
import sys

import pytest

from sfd_fast.cli.main import build_parser, main

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{command} option {action.option_strings} has no help"


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "sfd_fast.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in SUBCOMMANDS)


def test_distill_bad_forget_class_names_value_and_range(tmp_path, tiny_teacher, capsys):
    from sfd_fast import save_denoiser

    save_denoiser(tiny_teacher, tmp_path / "teacher")
    code = main(["distill", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "out"),
                 "--forget", "12", "--steps", "1", "--no-progress"])
    assert code == 2
    assert "forget class 12 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_distill_missing_teacher_is_a_clear_error(tmp_path, capsys):
    code = main(["distill", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_distill_and_evaluate_end_to_end_on_tiny(tmp_path, tiny_teacher):
    from sfd_fast import save_denoiser
    from sfd_fast.eval.classifier import DigitClassifier

    save_denoiser(tiny_teacher, tmp_path / "teacher")
    DigitClassifier().save(tmp_path / "clf.safetensors")  # untrained: only the plumbing is under test
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "run"), "--steps", "2",
                 "--set", "batch_size=4", "--set", "forget_batch_size=2", "--no-progress"]) == 0
    assert (tmp_path / "run" / "generator" / "sfd_fast.json").exists()
    assert main(["evaluate", "--generator", str(tmp_path / "run" / "generator"), "--classifier",
                 str(tmp_path / "clf.safetensors"), "--out", str(tmp_path / "eval"), "--per-class", "2"]) == 0
    import json

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"forget_accuracy", "override_rate", "remain_accuracy", "nfe"} and metrics["nfe"] == 1
    assert (tmp_path / "eval" / "samples.png").stat().st_size > 0


def test_set_overrides_parse_json_and_name_bad_values():
    from sfd_fast.core.config import parse_overrides

    assert parse_overrides(["lr_gen=1e-4", "override_classes=null"]) == {"lr_gen": 1e-4, "override_classes": None}
    with pytest.raises(ValueError, match="--set lr_gen: value 'fast' is not JSON"):
        parse_overrides(["lr_gen=fast"])
    with pytest.raises(ValueError, match="--set expects FIELD=VALUE"):
        parse_overrides(["lr_gen"])
