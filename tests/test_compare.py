"""``sfd-fast compare`` end to end on the tiny config: every method, every output file (issue 7)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from evalb_helpers import small_classifier

from sfd_fast.cli.main import main
from sfd_fast.core.config import SFDConfig
from sfd_fast.eval.compare import METHODS, CompareConfig
from sfd_fast.models.networks import save_denoiser


def _tiny_compare(tmp_path, teacher, *extra: str, name: str = "cmp") -> Path:
    """``sfd-fast compare`` on the tiny teacher with the smallest budgets; returns its --out (``tmp_path/name``).

    The teacher and classifier files are written once per ``tmp_path``: later runs read the same ones.
    """
    if not (tmp_path / "clf.safetensors").exists():
        save_denoiser(teacher, tmp_path / "teacher")
        small_classifier().save(tmp_path / "clf.safetensors")
    out = tmp_path / name
    rc = main(["compare", "--teacher", str(tmp_path / "teacher"), "--classifier", str(tmp_path / "clf.safetensors"),
               "--out", str(out), "--finetune-steps", "1", "--finetune-batch", "2", "--teacher-steps", "2",
               "--attack-steps", "1", "--attack-samples", "2", "--attack-sampler-steps", "1", "--per-class", "3",
               "--set", "batch_size=2", "--set", "forget_batch_size=2", "--fid-features", "classifier",
               "--no-progress", *extra])
    assert rc == 0
    return out


def test_compare_runs_every_method_and_writes_table_plots_and_grids(tmp_path, tiny_teacher, capsys):
    out = _tiny_compare(tmp_path, tiny_teacher, "--distill-steps", "1", "--robust-inner-steps", "1",
                        "--train-seeds", "0")
    saved = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in saved["rows"]}
    assert list(rows) == list(METHODS)
    sfd, quality = saved["meta"]["config"]["sfd"], SFDConfig.from_name("quality")  # the default preset: the demo's
    assert (sfd["ema_halflife_kimg"], sfd["ema_rampup_ratio"]) == (quality.ema_halflife_kimg, quality.ema_rampup_ratio)
    # Same sampler, same noise: retention against itself is exactly 0.
    assert rows["teacher"]["retention_vs_teacher"] == 0.0
    assert rows["sid"]["retention_vs_sid"] == 0.0
    assert all(r["fid_features"] == "classifier features" for r in rows.values())
    assert rows["sfd"]["nfe"] == 1 and rows["esd"]["nfe"] == 3  # Heun: 2 * steps - 1
    for r in rows.values():
        for key in ("forget_accuracy", "remain_accuracy", "override_rate", "asr_before", "asr_after"):
            assert 0.0 <= r[key] <= 1.0
    with open(out / "compare.csv") as f:
        assert len(list(csv.DictReader(f))) == len(METHODS)
    md = (out / "compare.md").read_text()
    assert "FID (classifier features)" in md and "Command: `" in md
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert all((out / f"samples_{m}.png").is_file() for m in METHODS)


def test_compare_rejects_unknown_methods():
    with pytest.raises(ValueError, match=r"unknown methods \['dreambooth'\]"):
        CompareConfig(methods=("sfd", "dreambooth"))


def test_report_marks_missing_values_and_names_the_fid_features():
    from sfd_fast.eval.report import markdown_table

    row = {"method": "sfd", "nfe": 1, "forget_accuracy": 0.1, "override_rate": 0.8, "remain_accuracy": 0.9,
           "fid": 1.5, "fid_features": "inception (ONNX)", "retention_vs_teacher": 0.01, "retention_vs_sid": None,
           "asr_before": 0.1, "asr_after": 0.5, "train_seconds": 3.0, "sample_ms_per_image": 0.4}
    table = markdown_table([row])
    assert "FID (inception (ONNX))" in table
    assert table.splitlines()[-1].split(" | ")[7] == "–"  # retention vs SiD: not run


def test_two_training_seeds_give_mean_spread_and_the_sid_noise_floor(tmp_path, tiny_teacher):
    out = _tiny_compare(tmp_path, tiny_teacher, "--methods", "teacher,sid,esd", "--distill-steps", "2",
                        "--train-seeds", "0,1")
    report = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    sid = rows["sid"]
    per_seed = [sid["seeds"][s]["fid"] for s in ("0", "1")]
    assert per_seed[0] != per_seed[1]  # the seed reaches training
    assert sid["fid"] == pytest.approx(sum(per_seed) / 2) and sid["fid_spread"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2)
    assert rows["teacher"]["fid_spread"] == 0.0  # the teacher does not train: evaluation noise is fixed
    floor = report["meta"]["noise_floor"]
    assert floor["seeds"] == [0, 1] and floor["sid_retention_seed_vs_seed"] > 0
    assert [p["step"] for p in sid["seeds"]["0"]["train_log"]["curve"]] == [1, 2]
    md = (out / "compare.md").read_text()
    assert "Noise floor, plain SiD seed against seed" in md and " ± " in md
    with pytest.raises(SystemExit):
        main(["compare", "--train-seeds", "0,0"])


def test_seeds_in_worker_processes_give_the_rows_of_one_process(tmp_path, tiny_teacher):
    """--jobs 2 trains each seed in its own spawned process at 1 thread: same rows as in-process at 1 thread."""
    import torch

    extra = ("--methods", "teacher,sid,sfd", "--distill-steps", "2", "--train-seeds", "0,1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = _tiny_compare(tmp_path, tiny_teacher, *extra, name="serial")
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(2)  # two workers at 1 thread each
    try:
        parallel = _tiny_compare(tmp_path, tiny_teacher, *extra, "--jobs", "2", name="parallel")
    finally:
        torch.set_num_threads(threads)
    a, b = (json.loads((d / "compare.json").read_text()) for d in (serial, parallel))
    assert b["meta"]["jobs"] == 2 and b["meta"]["threads_per_job"] == 1
    for row_a, row_b in zip(a["rows"], b["rows"]):
        for seed in ("0", "1"):
            for key in ("fid", "forget_accuracy", "remain_accuracy", "retention_vs_teacher", "asr_after"):
                assert row_b["seeds"][seed][key] == pytest.approx(row_a["seeds"][seed][key], rel=1e-5, abs=1e-6), key
    assert b["meta"]["noise_floor"]["sid_retention_seed_vs_seed"] == pytest.approx(
        a["meta"]["noise_floor"]["sid_retention_seed_vs_seed"], rel=1e-5)
    assert {p.name for p in parallel.glob("samples_*.png")} == {f"samples_{m}.png" for m in ("teacher", "sid", "sfd")}
