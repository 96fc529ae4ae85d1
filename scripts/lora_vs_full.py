"""The embedded demo with a LoRA fake score vs full fine-tuning, side by side (issue 18).

    OMP_NUM_THREADS=1 python scripts/lora_vs_full.py            # writes bench/results/lora-vs-full-cpu-<date>.json
    python scripts/lora_vs_full.py --steps 40 --per-class 20 --out /tmp/quick.json   # a quick look

Both runs are ``sfd-fast demo``'s recipe (cli/demo.py ``run_demo``): the committed teacher and
classifier, the "demo" SFD preset (forget 0 -> override 1), ``DEMO_STEPS`` iterations of the
reference step, the EMA generator evaluated with ``per_class`` samples per class. The only
difference is ``SFDState.create(..., lora=LoRAConfig(...))``. Each run is its own subprocess, so
its peak RSS (``ru_maxrss``) is its own; memory is also counted exactly from the state's tensors
(``core.lora.state_bytes``: weights and buffers with shared storage once, gradients, Adam states).
Step time: the median over all steps of the host clock around ``train_step`` (CPU: no sync needed).
The teacher sampler's metrics (the remain-accuracy reference of the demo's acceptance) are
computed once, in the parent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sfd_fast.io.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
# Measured (docs/lora.md): rank 16 at the preset's lr_fake 3e-4 lets G's forget class collapse (override
# rate 0.00, remain 0.80: the adapter, starting at B = 0, tracks G too slowly); 3e-3 forgets like full FT.
LORA_LR = 3e-3


def environment() -> dict:
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers
    import peft
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            **git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_one(mode: str, args) -> dict:
    """One demo run (in this process): train, evaluate the EMA generator, count memory."""
    from sfd_fast.cli.demo import DEMO_STEPS, TEACHER_DIR
    from sfd_fast.core.config import SFDConfig
    from sfd_fast.core.forget import ForgetSpec
    from sfd_fast.core.lora import LoRAConfig, state_bytes
    from sfd_fast.core.state import SFDState
    from sfd_fast.core.step import train_step
    from sfd_fast.eval.classifier import CLASSIFIER_FILE, DigitClassifier
    from sfd_fast.eval.evaluate import evaluate_sampler
    from sfd_fast.models.networks import load_denoiser

    steps = args.steps or DEMO_STEPS
    torch.manual_seed(args.seed)
    teacher = load_denoiser(TEACHER_DIR, "cpu")
    classifier = DigitClassifier.load(CLASSIFIER_FILE, "cpu")
    config = SFDConfig.from_name("demo").replace(seed=args.seed)
    if mode == "lora":
        config = config.replace(**({"lr_fake": args.lora_lr} if args.lora_lr else {}))
        lora = LoRAConfig(rank=args.rank, alpha=args.alpha, generator=args.lora_generator)
    else:
        lora = None
    spec = ForgetSpec.from_config(config, teacher.num_classes)
    state = SFDState.create(config, teacher, "cpu", lora=lora)
    del teacher  # LoRA mode keeps the teacher's weights once, inside the fake score
    times, log = [], []
    start = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        metrics = train_step(state)
        times.append(time.perf_counter() - t0)
        if (i + 1) % 25 == 0 or i + 1 == steps:
            log.append({"step": i + 1, **{k: float(v) for k, v in metrics.items() if k.startswith("loss")}})
            print(f"[{mode}] step {i + 1}/{steps} {log[-1]} {time.perf_counter() - start:.0f}s", file=sys.stderr,
                  flush=True)
    train_s = time.perf_counter() - start
    generator = state.generator_ema.eval()
    m = evaluate_sampler(generator, 1, classifier, spec, state.image_shape, per_class=args.per_class,
                         seed=args.seed, device="cpu")
    return {"mode": mode, "lora": None if lora is None else lora.to_dict(), "config": config.to_dict(), "steps": steps,
            "forget_accuracy": m["forget_accuracy"], "override_rate": m["override_rate"],
            "remain_accuracy": m["remain_accuracy"],
            "step_seconds_median": statistics.median(times),
            "step_seconds_iqr": _iqr(times), "step_seconds_all_median_excl_first": statistics.median(times[1:]),
            "train_seconds": train_s, "state_bytes": state_bytes(state),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "log": log}


def _iqr(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def teacher_metrics(args) -> dict:
    from sfd_fast.cli.demo import TEACHER_DIR
    from sfd_fast.core.config import SFDConfig
    from sfd_fast.core.forget import ForgetSpec
    from sfd_fast.eval.classifier import CLASSIFIER_FILE, DigitClassifier
    from sfd_fast.eval.evaluate import evaluate_sampler, teacher_sampler
    from sfd_fast.models.networks import load_denoiser

    teacher = load_denoiser(TEACHER_DIR, "cpu")
    classifier = DigitClassifier.load(CLASSIFIER_FILE, "cpu")
    spec = ForgetSpec.from_config(SFDConfig.from_name("demo"), teacher.num_classes)
    sampler, nfe = teacher_sampler(teacher, 18)
    return evaluate_sampler(sampler, nfe, classifier, spec, teacher.image_shape, per_class=args.per_class,
                            seed=args.seed, prefix="teacher_", device="cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="SFD iterations (default: the demo's DEMO_STEPS)")
    p.add_argument("--per-class", type=int, default=100, help="evaluation samples per class (default 100, the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the fake score (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, scale 1)")
    p.add_argument("--lora-lr", type=float, default=LORA_LR,
                   help=f"lr_fake of the LoRA run (default {LORA_LR}: 10x the preset's 3e-4, see docs/lora.md)")
    p.add_argument("--lora-generator", action="store_true", help="G = teacher + LoRA too")
    p.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher sampler's metrics")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return 0
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    runs = {}
    for mode in args.modes:
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", mode], capture_output=False,
                              stdout=subprocess.PIPE, text=True, check=True)
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"what": "sfd-fast demo recipe (embedded MNIST teacher, 'demo' preset, forget 0 -> override 1): "
                      "LoRA fake score vs full fine-tuning",
              "environment": environment(), "runs": runs,
              "memory_measured": "state_bytes: exact bytes of the state's tensors (weights+buffers, shared storage "
                                 "once; gradients; Adam states); peak_rss_bytes: the run's process peak RSS (CPU, "
                                 "includes the Python/torch runtime and the evaluation)",
              "time_measured": "host perf_counter around train_step, median over all steps, one process per run, "
                               "runs one after the other on a shared 2-core CPU"}
    if not args.no_teacher:
        result["teacher"] = teacher_metrics(args)
    if {"full", "lora"} <= set(runs):
        f, lo = runs["full"], runs["lora"]
        result["side_by_side"] = {
            k: {"full": f[k], "lora": lo[k]} for k in ("forget_accuracy", "override_rate", "remain_accuracy",
                                                      "step_seconds_median", "peak_rss_bytes")}
        result["side_by_side"]["state_bytes_total"] = {"full": f["state_bytes"]["total"],
                                                       "lora": lo["state_bytes"]["total"]}
        result["step_time_ratio_lora_over_full"] = lo["step_seconds_median"] / f["step_seconds_median"]
        result["state_bytes_ratio_lora_over_full"] = lo["state_bytes"]["total"] / f["state_bytes"]["total"]
    out = args.out or REPO / "bench" / "results" / f"lora-vs-full-cpu-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("side_by_side", runs), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
