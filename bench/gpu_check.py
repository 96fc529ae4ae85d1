"""The Python half of bench/gpu_check.sh: wheel lists, the CUDA-graph step check, the report.

    python bench/gpu_check.py wheel-list            # pinned wheels the GPU machine lacks (-> bench/gpu_wheels.txt)
    python bench/gpu_check.py fetch-wheels [--python-version 3.11] [--dest bench/.wheels]
    python bench/gpu_check.py missing               # entries of bench/gpu_wheels.txt not installed here
    python bench/gpu_check.py record STAGE STATUS SECONDS BUDGET [REASON]
    python bench/gpu_check.py graph-check --compile off|auto --out FILE
    python bench/gpu_check.py report --work DIR --mode gpu|cpu [--out FILE]

Only the standard library is imported at the top: ``missing`` runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WHEEL_LIST = BENCH / "gpu_wheels.txt"
# What the GPU machine is assumed to have: these and everything they depend on.
PROVIDED = ("torch", "triton", "onnx", "onnxruntime")
# What the check needs on top: the project's own requirements with the extras the suites use,
# the test tools, a build helper, and NVML bindings (driver version and clocks in the report).
NEEDED_EXTRAS = ("onnx", "text")
NEEDED_TOOLS = ("pytest", "pytest-benchmark", "ninja", "wheel")
# Needed but not part of the dev venv (no dependencies of its own): pinned here.
NEEDED_PINNED = {"nvidia-ml-py": "13.615.71"}
GPU_ONLY = {"nvidia-ml-py"}  # not required by ``missing --mode cpu``
STAGES = ("wheels", "build", "tests", "kernels", "train_step", "t2i_step", "cuda_graph", "inference", "report")


# ---------------------------------------------------------------------------------------- wheels

def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots: list[str], extras: dict[str, tuple[str, ...]] | None = None) -> dict[str, str]:
    """{canonical name: installed version} of ``roots`` and their installed dependencies (markers evaluated here)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    extras = extras or {}
    versions: dict[str, str] = {}
    visited: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(r, tuple(extras.get(r, ()))) for r in roots]
    while todo:
        name, wanted = todo.pop()
        if (_canonical(name), wanted) in visited:
            continue
        visited.add((_canonical(name), wanted))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"wheel-list: {name} is not installed in this environment; run it in the "
                             f"project's dev venv (bash scripts/run.sh test builds one)") from None
        versions[_canonical(dist.metadata["Name"])] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in wanted] + [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(sorted(req.extras))))
    return versions


def wheel_list() -> list[str]:
    """``name==version`` of every package the check needs that torch/triton/onnx/onnxruntime do not bring."""
    provided = _closure(list(PROVIDED))
    needed = _closure(["sfd_fast", *NEEDED_TOOLS], {"sfd_fast": NEEDED_EXTRAS})
    needed.update(NEEDED_PINNED)
    return sorted(f"{name}=={version}" for name, version in needed.items()
                  if name not in provided and name != "sfd-fast")


def read_wheel_list() -> list[str]:
    return [line.split("#")[0].strip() for line in WHEEL_LIST.read_text().splitlines()
            if line.split("#")[0].strip()]


def missing(mode: str = "gpu") -> list[str]:
    """Entries of bench/gpu_wheels.txt with no installed distribution of that name (any version counts)."""
    from importlib import metadata

    out = []
    for req in read_wheel_list():
        name = req.split("==")[0]
        if mode == "cpu" and name in GPU_ONLY:
            continue
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(req)
    return out


def fetch_wheels(dest: Path, python_version: str) -> int:
    """pip download --no-deps of exactly bench/gpu_wheels.txt for CPython ``python_version`` on Linux x86_64."""
    dest.mkdir(parents=True, exist_ok=True)
    tag = python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest), "--only-binary=:all:",
           "--implementation", "cp", "--python-version", python_version, "--abi", f"cp{tag}", "--abi", "abi3",
           "--abi", "none"]
    for platform in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64", "any"):
        cmd += ["--platform", platform]
    cmd += read_wheel_list()
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    files = sorted(dest.glob("*.whl"))
    total = sum(f.stat().st_size for f in files)
    print(f"\n{len(files)} wheels in {dest}: {total / 2**20:.1f} MiB ({total} bytes)")
    for f in files:
        print(f"  {f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
    return rc


# ---------------------------------------------------------------------------------------- stages

def record(work: Path, stage: str, status: str, seconds: float, budget: float, reason: str = "") -> None:
    with open(work / "stages.jsonl", "a") as f:
        f.write(json.dumps({"stage": stage, "status": status, "seconds": round(seconds, 1), "budget_s": budget,
                            "reason": reason}) + "\n")


# ---------------------------------------------------------------------------------------- CUDA-graph check

GRAPH_STEPS = 6  # the "fast" preset warms up 2 steps eagerly, captures on the 3rd, replays after
GRAPH_RTOL = 2e-2  # bf16 autocast: capture turns autocast's weight-cast cache off, rounding may differ
GRAPH_ATOL = 1e-4  # floor for metrics near zero


def graph_check(compile_mode: str, out: Path, device: str = "cuda") -> int:
    """Preset "fast" with cuda_graph="on" vs the same options eager, tiny UNet, same seed: finite and close.

    ``device="cpu"`` is a dry run of this function's plumbing only: cuda_graph="auto" there falls
    back to eager, so both runs are eager.
    """
    import copy

    import torch

    from sfd_fast import EDMDenoiser, SFDConfig, SFDState, UNetConfig, build_unet, train_step
    from sfd_fast.core.step_options import StepOptions

    result: dict = {"compile": compile_mode, "steps": GRAPH_STEPS, "rtol": GRAPH_RTOL,
                    "model": "tiny UNet, batch 8 + 4, fake score perturbed by 0.02 N(0, 1)"}
    if device == "cuda" and not torch.cuda.is_available():
        result.update(status="SKIPPED", reason="no CUDA device")
        out.write_text(json.dumps(result, indent=2))
        return 0
    torch.manual_seed(0)
    teacher = EDMDenoiser(build_unet(UNetConfig.from_name("tiny"))).to(device).eval()
    config = SFDConfig(batch_size=8, forget_batch_size=4)
    graph_options = StepOptions.from_name("fast").replace(cuda_graph="on" if device == "cuda" else "auto",
                                                          compile=compile_mode)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runs = {}
    for name, options in (("eager", graph_options.replace(cuda_graph="off")), ("graph", graph_options)):
        state = SFDState.create(config, copy.deepcopy(teacher), device=device)
        # Move psi off the teacher, as mid-training: at init the generator loss is a difference of
        # two equal networks, pure rounding noise, and comparing it would test nothing.
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in state.fake.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)
        metrics, times = [], []
        for _ in range(GRAPH_STEPS):
            start = time.perf_counter()
            m = train_step(state, options=options)
            sync()
            times.append(time.perf_counter() - start)
            metrics.append({k: float(v) for k, v in m.items()})
        ema = torch.cat([p.detach().float().flatten() for p in state.generator_ema.parameters()])
        runs[name] = {"metrics": metrics, "step_s": times, "ema": ema}
    worst, within = {}, {}
    for key in runs["eager"]["metrics"][0]:
        pairs = list(zip(runs["eager"]["metrics"], runs["graph"]["metrics"]))
        worst[key] = max(abs(g[key] - e[key]) / max(abs(e[key]), 1e-12) for e, g in pairs)
        if key.startswith("loss"):
            within[key] = all(abs(g[key] - e[key]) <= GRAPH_ATOL + GRAPH_RTOL * abs(e[key]) for e, g in pairs)
        else:  # counts (non-finite samples, skipped updates): equal
            within[key] = all(g[key] == e[key] for e, g in pairs)
    finite = all(v == v and abs(v) != float("inf") for r in runs.values() for m in r["metrics"] for v in m.values())
    ema_diff = (runs["graph"]["ema"] - runs["eager"]["ema"]).abs().max().item()
    ok = finite and all(within.values())
    result.update(
        status="PASSED" if ok else "FAILED", finite=finite, max_rel_diff=worst, ema_max_abs_diff=ema_diff,
        options=graph_options.to_dict(),
        metrics={name: r["metrics"] for name, r in runs.items()},
        # Host time of each step after sync; steps 1-3 include warm-up / compile / capture. Tiny
        # model: launch-bound, a plumbing check, not a benchmark.
        step_s={name: r["step_s"] for name, r in runs.items()},
        within=within, atol=GRAPH_ATOL,
        reason="" if ok else f"graph vs eager beyond rtol {GRAPH_RTOL} + atol {GRAPH_ATOL}, or non-finite: "
                             f"{sorted(k for k, v in within.items() if not v)}")
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("status", "finite", "max_rel_diff", "ema_max_abs_diff")}, indent=2))
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------- report

def _benchmarks(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        stats = {k: b["stats"].get(k) for k in ("median", "iqr", "q1", "q3", "min", "max", "mean", "stddev",
                                               "rounds", "iterations")}
        rows.append({"name": b["name"], "params": b.get("params"), "group": b.get("group"), "stats": stats,
                     "extra_info": b.get("extra_info", {}), "timer": b.get("options", {}).get("timer")})
    return rows


def _skips(path: Path) -> list[dict]:
    """Skipped tests and their reasons from a pytest --junitxml file."""
    if not path.is_file():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None:
            out.append({"test": case.get("name"), "reason": skipped.get("message", "")})
    return out


def _test_counts(path: Path) -> dict:
    """{"passed", "failed", "errors", "skipped", "failed_tests"} of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failed_tests"].append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failed_tests"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _kernel_table(rows: list[dict], skips: list[dict]) -> list[str]:
    providers = ["torch", "compiled", "triton", "cuda"]
    cells: dict[tuple, dict] = {}
    for r in rows:
        e = r["extra_info"]
        if "gbps" in e:
            cells.setdefault((e["kernel"], e["pass"], e["size"], e["dtype"]), {})[e["provider"]] = e
    reasons: dict[str, str] = {}
    for s in skips:  # test_sid_loss[size-dtype-pass-provider]
        m = re.match(r"test_(sid|edm)_loss\[.*-(\w+)\]$", s["test"] or "")
        if m:
            reasons.setdefault(m.group(2), re.sub(r"^Skipped: ", "", s["reason"]))
    present = [p for p in providers if any(p in c for c in cells.values())]
    lines = ["Kernels: GB/s per provider (explicit byte count, bench_kernels.traffic_bytes) and its fraction of "
             "the copy GB/s of the same bytes, timed the same way",
             f"  {'kernel':6} {'pass':8} {'size':21} {'dtype':9} {'copy GB/s':>10} " +
             " ".join(f"{p + ' GB/s (copy)':>22}" for p in present)]
    for key in sorted(cells):
        c = cells[key]
        copy = c.get("copy", {}).get("gbps")
        parts = []
        for p in present:
            e = c.get(p)
            if e is None:
                parts.append(f"{'skipped':>22}")
            else:
                frac = f" ({e['fraction_of_copy']:.0%})" if "fraction_of_copy" in e else ""
                parts.append(f"{e['gbps']:.1f}{frac}".rjust(22))
        lines.append(f"  {key[0]:6} {key[1]:8} {key[2]:21} {key[3]:9} {_fmt(copy, '10.1f'):>10} " + " ".join(parts))
    if rows:
        lines.append(f"  timing: {rows[0]['extra_info'].get('timing', '?')}")
        notes = sorted({r['extra_info'].get('size', '') + ': ' + r['extra_info'].get('l2_note', '') for r in rows})
        lines += [f"  {n}" for n in notes]
    for p, why in sorted(reasons.items()):
        lines.append(f"  {p} skipped: {why}")
    return lines


def _step_table(title: str, rows: list[dict]) -> list[str]:
    lines = [title, f"  {'provider':26} {'median ms':>10} {'IQR ms':>8} {'images/s':>9} {'vs ref':>7} "
                    f"{'F/step':>6} {'TFLOP/s':>8} {'MFU':>6} {'HFU':>6}  note"]
    for r in rows:
        e, s = r["extra_info"], r["stats"]
        note = e.get("note") or ""
        lines.append(f"  {e.get('provider', r['name']):26} {s['median'] * 1e3:10.1f} {s['iqr'] * 1e3:8.1f} "
                     f"{_fmt(e.get('images_per_s'), '9.1f'):>9} {_fmt(e.get('speedup_vs_reference'), '6.2f'):>6}x "
                     f"{_fmt(e.get('step_units_of_forward'), '6.1f'):>6} "
                     f"{_fmt(e['achieved_flops_per_s'] / 1e12 if e.get('achieved_flops_per_s') else None, '8.3f'):>8} "
                     f"{_fmt(e.get('mfu'), '6.1%'):>6} {_fmt(e.get('hfu'), '6.1%'):>6}  {note}")
    return lines


def _inference_table(rows: list[dict], skips: list[dict]) -> list[str]:
    lines = ["Inference: one-step generator latency / throughput (host timer + sync; tiny preset unless "
             "SFD_BENCH_PRESET)",
             f"  {'group':15} {'provider':24} {'median ms':>10} {'images/s':>9} {'vs eager':>9}  note"]
    eager = {r["group"]: r["stats"]["median"] for r in rows if r["name"].startswith("test_torch_eager")}
    for r in sorted(rows, key=lambda r: (r["group"] or "", r["name"])):
        e, s = r["extra_info"], r["stats"]
        name = r["name"].split("[")[0].removeprefix("test_")
        if "ort_providers" in e:
            name += f" ({e['ort_providers'][0].removesuffix('ExecutionProvider')})"
        ratio = eager.get(r["group"], 0) / s["median"] if r["group"] in eager else None
        lines.append(f"  {r['group'] or '':15} {name:24} {s['median'] * 1e3:10.2f} "
                     f"{e.get('images', 1) / s['median']:9.1f} {_fmt(ratio, '8.2f'):>8}x  {e.get('note', '')}")
    for s in {(s["test"].split("[")[0], s["reason"]) for s in skips}:
        lines.append(f"  {s[0].removeprefix('test_')} skipped: {s[1]}")
    return lines


def report(work: Path, mode: str, out: Path | None) -> int:
    sys.path.insert(0, str(BENCH))
    from _environment import device_slug, environment

    env = environment()
    stages = [json.loads(line) for line in (work / "stages.jsonl").read_text().splitlines()] \
        if (work / "stages.jsonl").is_file() else []
    result = {"kind": "sfd_fast bench/gpu_check.sh", "mode": mode, "environment": env, "stages": stages}
    for suite in ("kernels", "train_step", "t2i_step", "inference"):
        files = [suite] + (["inference_compiled"] if suite == "inference" else [])
        result[suite] = [row for f in files for row in _benchmarks(work / f"{f}.json")]
        result[f"{suite}_skipped"] = [s for f in files for s in _skips(work / f"{f}.xml")]
    result["tests"] = {p.stem: _test_counts(p) for p in sorted(work.glob("tests_*.xml"))}
    result["cuda_graph"] = [json.loads(p.read_text()) for p in sorted(work.glob("cuda_graph_*.json"))]
    if out is None:
        stem = f"gpu-{device_slug(env)}-{env['date'][:10]}"
        out = BENCH / "results" / f"{stem}.json"
        k = 2
        while out.exists():
            out = BENCH / "results" / f"{stem}-{k}.json"
            k += 1
    out.parent.mkdir(parents=True, exist_ok=True)

    lines = [f"gpu_check ({mode} mode) on {env['device']}"]
    if env.get("device_type") == "cuda":
        lines.append(f"  driver {env.get('driver')}, CUDA runtime {env.get('cuda_runtime')}, compute capability "
                     f"{env.get('compute_capability')}, SM clock {env.get('clocks_sm_mhz')}/"
                     f"{env.get('clocks_max_sm_mhz')} MHz (now/max), memory clock {env.get('clocks_mem_mhz')} MHz, "
                     f"L2 {(env.get('l2_cache_bytes') or 0) / 2**20:.0f} MiB")
    lines += [f"  torch {env['torch']}, triton {env.get('triton')}, onnxruntime {env.get('onnxruntime')} "
              f"{env.get('onnxruntime_providers')}, tensorrt {env.get('tensorrt')}, torch threads "
              f"{env['torch_threads']} (OMP_NUM_THREADS={env['env'].get('OMP_NUM_THREADS', 'unset')})",
              f"  commit {env['commit'].get('id')}{' (dirty)' if env['commit'].get('dirty') else ''}, {env['date']}",
              "", "Stages", f"  {'stage':11} {'status':8} {'seconds':>8} {'budget':>7}  reason"]
    for s in stages:
        lines.append(f"  {s['stage']:11} {s['status']:8} {s['seconds']:8.1f} {s['budget_s']:7.0f}  {s['reason']}")
    for name, c in result["tests"].items():
        failed = f"; failed: {', '.join(c['failed_tests'][:10])}" if c["failed_tests"] else ""
        lines.append(f"  {name}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped{failed}")
    if result["kernels"]:
        lines += [""] + _kernel_table(result["kernels"], result["kernels_skipped"])
    if result["train_step"]:
        lines += [""] + _step_table("Train step (bench_train_step.py; MFU/HFU against the dense bf16 peak, GPU only)",
                                    result["train_step"])
    if result["t2i_step"]:
        lines += [""] + _step_table("Text-to-image train step (bench_t2i_step.py)", result["t2i_step"])
    if result["inference"] or result["inference_skipped"]:
        lines += [""] + _inference_table(result["inference"], result["inference_skipped"])
    if result["cuda_graph"]:
        lines += ["", "CUDA-graph capture of the whole step (preset 'fast', cuda_graph='on' vs the same options eager)"]
        for g in result["cuda_graph"]:
            if "max_rel_diff" not in g:  # SKIPPED / TIMEOUT: nothing was compared
                lines.append(f"  compile={g['compile']:5} {g['status']:8} {g.get('reason', '')}")
                continue
            worst = max(g["max_rel_diff"].values())
            lines.append(f"  compile={g['compile']:5} {g['status']:8} max rel diff of metrics {worst:.2e} over "
                         f"{g['steps']} steps, EMA weights max abs diff {_fmt(g.get('ema_max_abs_diff'), '.2e')}  "
                         f"{g.get('reason', '')}")
    table = "\n".join(lines)
    result["summary"] = table
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table)
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


# ---------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("wheel-list", help="print the pinned wheels the GPU machine lacks")
    fetch = sub.add_parser("fetch-wheels", help="pip download --no-deps of bench/gpu_wheels.txt")
    fetch.add_argument("--dest", type=Path, default=BENCH / ".wheels")
    fetch.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    miss = sub.add_parser("missing", help="print entries of bench/gpu_wheels.txt that are not installed")
    miss.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    rec = sub.add_parser("record", help="append one stage result to WORK/stages.jsonl")
    rec.add_argument("work", type=Path)
    rec.add_argument("stage")
    rec.add_argument("status", choices=("PASSED", "FAILED", "SKIPPED"))
    rec.add_argument("seconds", type=float)
    rec.add_argument("budget", type=float)
    rec.add_argument("reason", nargs="?", default="")
    graph = sub.add_parser("graph-check", help="CUDA-graph capture of the whole step vs eager")
    graph.add_argument("--compile", choices=("off", "auto"), default="off")
    graph.add_argument("--out", type=Path, required=True)
    graph.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: plumbing dry run, both eager")
    rep = sub.add_parser("report", help="write the result JSON and print the summary table")
    rep.add_argument("--work", type=Path, required=True)
    rep.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    rep.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.command == "wheel-list":
        print("\n".join(wheel_list()))
    elif args.command == "fetch-wheels":
        return fetch_wheels(args.dest, args.python_version)
    elif args.command == "missing":
        print(" ".join(missing(args.mode)))
    elif args.command == "record":
        record(args.work, args.stage, args.status, args.seconds, args.budget, args.reason)
    elif args.command == "graph-check":
        return graph_check(args.compile, args.out, args.device)
    elif args.command == "report":
        return report(args.work, args.mode, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
