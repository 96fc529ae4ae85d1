"""Fault injection for `sfd-fast distill`: kill -9 at random moments (saves included), damaged
checkpoints, a NaN teacher and an infinite learning rate; counts what survived.

    python scripts/fault_injection.py --trials 10 --out docs/faults/fault_injection.json

Every trial starts the same run as an uninterrupted reference (tiny teacher, checkpoint every
step, so a good part of the run's time is spent saving), SIGKILLs it at a random point (after a
random step k was reported, plus a random fraction of one step's time), on
every third trial also flips a byte of the newest checkpoint, then `--resume`s to the end and
compares the generator with the reference bit for bit. Lost steps = the last step the killed run
reported minus the step it resumed from. Seeded: the same --seed gives the same kill times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sfd_fast.cli", *args]


def distill_cmd(teacher: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return cli("distill", "--teacher", str(teacher), "--out", str(out), "--steps", str(steps),
               "--checkpoint-every", "1", "--keep-last", "3", "--log-every", "1",
               "--set", "batch_size=2", "--set", "forget_batch_size=1", *extra)


def generator_tensors(out: Path) -> dict[str, torch.Tensor]:
    from sfd_fast import load_generator

    return load_generator(out / "generator").state_dict()


def make_teacher(folder: Path, nan: bool = False) -> Path:
    from sfd_fast import EDMDenoiser, UNetConfig, build_unet
    from sfd_fast.models.networks import save_denoiser

    torch.manual_seed(0)
    teacher = EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).eval()
    if nan:
        with torch.no_grad():
            for p in teacher.parameters():
                p.fill_(float("nan"))
    save_denoiser(teacher, folder)
    return folder


def flip_a_byte(checkpoint: Path) -> None:
    weights = checkpoint / "state.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def trial(i: int, rng: random.Random, teacher: Path, work: Path, steps: int, budget: float,
          reference: dict[str, torch.Tensor]) -> dict:
    out = work / f"trial-{i}"
    proc = subprocess.Popen(distill_cmd(teacher, out, steps), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # Kill at a random point of the run, not of the wall clock (load makes the run's speed vary):
    # wait until step k is reported, then up to one step's time more (the save of step k+1 included).
    k, delay = rng.randrange(0, steps - 1), rng.uniform(0.0, budget / steps)
    reported, printed = [0], []
    for line in proc.stdout:
        printed.append(line)
        found = re.match(r"step (\d+):", line)
        if found:
            reported.append(int(found.group(1)))
            if reported[-1] >= k:
                break
    time.sleep(delay)
    killed = proc.poll() is None
    proc.kill()
    rest = proc.communicate()[0]
    reported += [int(m) for m in re.findall(r"^step (\d+):", rest, flags=re.M)]
    row = {"trial": i, "kill_after_step": k, "extra_delay_s": round(delay, 2), "killed_mid_run": killed,
           "last_reported_step": max(reported)}
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    row["stale_temporaries"] = len(list((out / "checkpoints").glob(".step-*.tmp-*")))
    if i % 3 == 2 and ckpts:
        flip_a_byte(ckpts[-1])
        row["damaged"] = ckpts[-1].name
    res = subprocess.run(distill_cmd(teacher, out, steps, "--resume"), capture_output=True, text=True)
    found = re.search(r"resumed from \S*step-(\d+)", res.stdout)
    row.update(resume_exit=res.returncode, resumed_from=int(found.group(1)) if found else 0,
               fell_back="skipped damaged checkpoint" in res.stdout)
    row["lost_steps"] = max(0, row["last_reported_step"] - row["resumed_from"])
    row["bit_exact"] = res.returncode == 0 and all(
        torch.equal(v, generator_tensors(out)[k]) for k, v in reference.items())
    if res.returncode != 0:
        row["resume_stderr"] = res.stderr.strip().splitlines()[-3:]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10, help="kill -9 trials (default: 10)")
    p.add_argument("--steps", type=int, default=12, help="SFD steps of each run (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill times (default: 0)")
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON (default: print only)")
    args = p.parse_args(argv)
    if args.trials < 1 or args.steps < 2:  # a kill point needs a step before the last one
        p.error(f"--trials must be >= 1 and --steps >= 2, got --trials {args.trials} --steps {args.steps}")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="sfd-faults-") as tmp:
        work = Path(tmp)
        teacher = make_teacher(work / "teacher")
        start = time.perf_counter()
        ref = subprocess.run(distill_cmd(teacher, work / "reference", args.steps), capture_output=True, text=True)
        budget = time.perf_counter() - start
        if ref.returncode != 0:
            print(ref.stderr, file=sys.stderr)
            return 1
        reference = generator_tensors(work / "reference")
        rows = [trial(i, rng, teacher, work, args.steps, budget, reference) for i in range(args.trials)]

        nan = subprocess.run(distill_cmd(make_teacher(work / "nan-teacher", nan=True), work / "nan", args.steps),
                             capture_output=True, text=True)
        inf = subprocess.run(distill_cmd(teacher, work / "inf", args.steps, "--set", "lr_gen=Infinity"),
                             capture_output=True, text=True)
        extra = {
            "nan_teacher": {"exit": nan.returncode, "generator_written": (work / "nan" / "generator").exists(),
                            "message": (nan.stderr.strip().splitlines() or [""])[-1]},
            "infinite_lr": {"exit": inf.returncode, "generator_written": (work / "inf" / "generator").exists(),
                            "message": (inf.stderr.strip().splitlines() or [""])[-1]},
        }
    killed = [r for r in rows if r["killed_mid_run"]]
    summary = {
        "trials": len(rows), "killed_mid_run": len(killed),
        "resumed": sum(r["resume_exit"] == 0 for r in rows),
        "bit_exact": sum(r["bit_exact"] for r in rows),
        "damaged_newest_fell_back": sum(r.get("fell_back", False) for r in rows if "damaged" in r),
        "damaged_trials": sum("damaged" in r for r in rows),
        "lost_steps_max": max((r["lost_steps"] for r in killed), default=0),
        "reference_run_s": round(budget, 1), "steps": args.steps, "seed": args.seed,
    }
    result = {"summary": summary, "trials": rows, **extra}
    print(json.dumps(result["summary"], indent=1))
    print(json.dumps(extra, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    ok = (summary["bit_exact"] == summary["trials"] and extra["nan_teacher"]["exit"] != 0
          and not extra["nan_teacher"]["generator_written"] and extra["infinite_lr"]["exit"] == 2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
