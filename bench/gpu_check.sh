#!/usr/bin/env bash
# bench/gpu_check.sh: the first run on a GPU machine, one command (issue 14).
#
#   bash bench/gpu_check.sh                  # on the GPU machine (H100/H200: <= 8 minutes)
#   bash bench/gpu_check.sh --cpu            # everything that runs without CUDA (a few minutes)
#   bash bench/gpu_check.sh --fetch-wheels   # on a networked machine, before: fills bench/.wheels/
#   bash bench/gpu_check.sh --help
#
# Stages, in order, each under its own `timeout` (seconds; sum 450 s; with the start-up
# checks and the 2 s kill grace per stage at most ~7 min 55 s). A stage that
# fails or runs out of time is recorded as FAILED (with the reason) and the next stage runs; the
# exit code is 1 if any stage FAILED. GPU-only stages print SKIPPED with the reason under --cpu.
#   wheels      60  install what is missing from bench/.wheels (pip --no-index), then sfd_fast itself
#                   (pip install --no-build-isolation --no-deps -e ., extension build skipped here)
#   build       85  the CUDA extension: TORCH_CUDA_ARCH_LIST=<this GPU's capability> pip install
#                   --no-build-isolation --no-deps -e . , then sfd_fast.core.cuda_ext.available()
#                   [GPU; needs a CUDA toolkit (nvcc); afterwards SFD_FAST_CUDA_JIT=0: no JIT retry]
#   tests       75  without TRITON_INTERPRET: pytest -m gpu tests/ (CUDA-graph step, fast preset,
#                   TensorRT engines), then test_cuda_ext.py, test_kernels_triton.py (all on CUDA)
#                   and test_export.py's TensorRT test, -m "not slow". --cpu: test_kernels_triton.py
#                   in the Triton interpreter and the CPU layer of test_cuda_ext.py
#   kernels     45  bench/bench_kernels.py, SFD_BENCH_QUICK=1 (CUDA events, L2 flush, copy roofline)
#   train_step  65  bench/bench_train_step.py, SFD_BENCH_QUICK=1 (reference vs fast, MFU)
#   t2i_step    25  bench/bench_t2i_step.py, SFD_BENCH_QUICK=1 [GPU; on 2 CPU cores a bf16 step takes
#                   tens of seconds]
#   cuda_graph  45  the whole training step captured in a CUDA graph: preset "fast" with
#                   cuda_graph="on" vs the same options eager, tiny UNet, 6 steps, finite and within
#                   rtol 2e-2; first with compile off, then (in the time left) with compile="auto" [GPU]
#   inference   40  bench/bench_inference.py, SFD_BENCH_QUICK=1: eager / onnxruntime / teacher first,
#                   then (in the time left) torch.compile and TensorRT. onnxruntime runs on
#                   CUDAExecutionProvider only with onnxruntime-gpu (the row says which ran);
#                   TensorRT is skipped with the reason when tensorrt is not installed. --cpu: no compile
#   report      10  bench/results/gpu-<device>-<date>.json (environment, stages, every measurement)
#                   and the summary table (stage logs and raw pytest-benchmark JSON: bench/.gpu_check/)
#
# Wheels. The GPU machine has no network and only torch, triton, onnx and onnxruntime. The
# rest (bench/gpu_wheels.txt: diffusers, huggingface-hub, safetensors, transformers, tokenizers,
# pillow, tqdm, pytest, pytest-benchmark, ninja, nvidia-ml-py, ... pinned to the dev venv's
# versions) is fetched beforehand on a networked machine with the same repository checkout:
#     bash bench/gpu_check.sh --fetch-wheels [--python-version 3.11]
# which runs `pip download --no-deps` of exactly that list for CPython <version> on Linux x86_64
# into bench/.wheels/ (gitignored; 45 wheels, 43.3 MiB for Python 3.11, measured). Copy
# bench/.wheels/ along with the checkout; the wheels stage installs from it with
# `pip install --no-index --find-links bench/.wheels`. Pass the GPU machine's Python version:
# pillow, pyyaml, regex, pydantic-core and charset-normalizer wheels are per-version.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
self="$here/gpu_check.sh"

usage() {
  sed -n '2,/^set -euo/p' "$self" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --cpu                 run what needs no CUDA; GPU-only stages are SKIPPED with the reason
  --fetch-wheels        download bench/gpu_wheels.txt into bench/.wheels/ (networked machine) and exit
  --python-version X.Y  target Python of --fetch-wheels (default: this python's)
  --python PATH         interpreter to use (default: $PYTHON, else python3)
  --no-install          skip the wheels stage (the environment is ready)
  --only a,b            run only these stages (report always runs)
  --skip a,b            skip these stages
  --budget-scale F      multiply every stage budget by F (default 1; 3 with --cpu); the 8-minute
                        bound on an H100/H200 holds for 1
  --out FILE            result JSON (default bench/results/gpu-<device>-<date>.json)
  -h, --help            this text
EOF
}

# ------------------------------------------------------------------ one stage, run as its own process
if [ "${1:-}" = "__stage" ]; then
  stage=$2
  skip() { echo "$*" >"$GC_WORK/$stage.reason"; exit 77; }
  note() { echo "$*" >>"$GC_WORK/$stage.note"; }  # shown in the table of a stage that passed
  bench() {  # name file [pytest args]: one pytest-benchmark run at reduced rounds, JSON + junit in the work dir
    local name=$1 file=$2
    shift 2
    env SFD_BENCH_QUICK=1 "$GC_PY" -m pytest -q -s -p no:cacheprovider "$file" "$@" --benchmark-enable \
      --benchmark-json="$GC_WORK/$name.json" --junitxml="$GC_WORK/$name.xml" -rs
  }
  cd "$root"
  py=$GC_PY
  case "$stage" in
    wheels)
      missing=$("$py" "$here/gpu_check.py" missing --mode "$GC_MODE")
      if [ -n "$missing" ]; then
        if [ ! -d "$here/.wheels" ]; then
          echo "missing: $missing"
          echo "bench/.wheels/ does not exist: run 'bash bench/gpu_check.sh --fetch-wheels' on a networked machine"
          exit 1
        fi
        # shellcheck disable=SC2086
        "$py" -m pip install --no-compile --no-index --find-links "$here/.wheels" $missing
      fi
      # Installed (not just importable from the checkout: sfd_fast.kernels exists only through the
      # package-dir mapping of an install) and pointing at this checkout. Checked from / so that
      # the working directory does not shadow the install.
      if ! (cd / && "$py" - "$root" <<'EOF'
import importlib.util, pathlib, sys
import sfd_fast
root = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(sfd_fast.__file__).resolve().is_relative_to(root), f"sfd_fast from {sfd_fast.__file__}"
spec = importlib.util.find_spec("sfd_fast.kernels")
assert spec is not None and pathlib.Path(spec.origin).resolve().is_relative_to(root / "kernels"), "no sfd_fast.kernels"
EOF
      ); then
        echo "installing sfd_fast from $root (editable, no CUDA build here)"
        SFD_FAST_SKIP_CUDA_BUILD=1 "$py" -m pip install --no-index --no-build-isolation --no-deps -e "$root"
      fi
      (cd / && "$py" -c "import sfd_fast, sfd_fast.kernels, diffusers, pytest_benchmark
print('sfd_fast from', sfd_fast.__file__)")
      ;;
    build)
      [ "$GC_MODE" = gpu ] || skip "needs CUDA (--cpu)"
      cuda_home=$("$py" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')")
      [ -n "$cuda_home" ] || skip "no CUDA toolkit (nvcc) on this machine: the cuda provider is skipped; Triton runs"
      arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
      echo "CUDA_HOME=$cuda_home TORCH_CUDA_ARCH_LIST=$arch"
      TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) SFD_FAST_SKIP_CUDA_BUILD=0 \
        "$py" -m pip install --no-index --no-build-isolation --no-deps -v -e "$root"
      SFD_FAST_CUDA_JIT=0 "$py" -c "
from sfd_fast.core import cuda_ext
ok, why = cuda_ext.available()
print('cuda_ext.available():', ok, why)
raise SystemExit(0 if ok else 1)"
      ;;
    tests)
      if [ "$GC_MODE" = gpu ]; then
        # The tests with CUDA branches: everything marked gpu, and the kernel files whose every
        # test runs on CUDA when there is a device. (test_fast_step's other tests run on CPU.)
        rc=0
        "$py" -m pytest -q -p no:cacheprovider -m gpu tests --junitxml="$GC_WORK/tests_gpu.xml" -rs || rc=$?
        "$py" -m pytest -q -p no:cacheprovider -m "not gpu and not slow" tests/test_cuda_ext.py \
          tests/test_kernels_triton.py tests/test_export.py::test_tensorrt_engine_matches_pytorch \
          --junitxml="$GC_WORK/tests_files.xml" -rs || rc=$?
        exit $rc
      fi
      # No GPU: tests/conftest.py sets TRITON_INTERPRET=1, so the Triton kernels run in the interpreter.
      "$py" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_kernels_triton.py tests/test_cuda_ext.py \
        --junitxml="$GC_WORK/tests_cpu.xml" -rs
      note "--cpu: Triton kernels in the interpreter, CPU layer of the CUDA extension"
      ;;
    kernels | train_step | t2i_step)
      if [ "$GC_MODE" = cpu ] && [ "$stage" = t2i_step ]; then
        skip "GPU stage: on 2 CPU cores a bf16 text-to-image step takes tens of seconds;" \
          "run bench/bench_t2i_step.py by itself"
      fi
      bench "$stage" "bench/bench_$stage.py"
      ;;
    inference)
      # Two runs, so that a slow torch.compile or TensorRT build (the second) cannot cost the
      # eager / onnxruntime / teacher numbers (the first) when the budget runs out.
      bench inference bench/bench_inference.py -k "not torch_compile and not tensorrt"
      if [ "$GC_MODE" = cpu ]; then
        note "--cpu: torch.compile rows not run (inductor on 2 cores takes minutes); TensorRT needs CUDA"
        exit 0
      fi
      left=$((GC_DEADLINE - $(date +%s) - 5))
      [ "$left" -gt 10 ] || { note "torch.compile / TensorRT rows not run: no time left in the budget"; exit 0; }
      rc=0
      timeout --kill-after=5 "$left" bash -c "$(declare -f bench)
bench inference_compiled bench/bench_inference.py -k 'torch_compile or tensorrt'" || rc=$?
      if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        note "torch.compile / TensorRT rows did not finish in the ${left}s left of the budget"
      elif [ "$rc" != 0 ]; then
        exit "$rc"
      fi
      ;;
    cuda_graph)
      [ "$GC_MODE" = gpu ] || skip "needs CUDA (--cpu)"
      "$py" "$here/gpu_check.py" graph-check --compile off --out "$GC_WORK/cuda_graph_compile_off.json"
      left=$((GC_DEADLINE - $(date +%s) - 5))
      if [ "$left" -gt 15 ]; then
        rc=0
        timeout --kill-after=5 "$left" "$py" "$here/gpu_check.py" graph-check --compile auto \
          --out "$GC_WORK/cuda_graph_compile_auto.json" || rc=$?
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
          why="did not finish in the ${left}s left of the stage budget (cold inductor cache)"
          printf '{"compile": "auto", "status": "TIMEOUT", "steps": 0, "reason": "%s"}\n' "$why" \
            >"$GC_WORK/cuda_graph_compile_auto.json"
        elif [ "$rc" != 0 ]; then
          exit "$rc"
        fi
      fi
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
  exit 0
fi

# ------------------------------------------------------------------ options
mode=gpu fetch=0 install=1 only="" skip_list="" scale="" out="" pyver=""
py=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --fetch-wheels) fetch=1 ;;
    --python-version) pyver=$2; shift ;;
    --python) py=$2; shift ;;
    --no-install) install=0 ;;
    --only) only=$2; shift ;;
    --skip) skip_list=$2; shift ;;
    --budget-scale) scale=$2; shift ;;
    --out) out=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# The budgets are sized for an H100/H200; a 2-core CPU box gets 3x unless told otherwise.
[ -n "$scale" ] || { [ "$mode" = cpu ] && scale=3 || scale=1; }

if [ "$fetch" = 1 ]; then
  exec "$py" "$here/gpu_check.py" fetch-wheels --dest "$here/.wheels" ${pyver:+--python-version "$pyver"}
fi

if [ "$mode" = gpu ] && ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch ($py); use --cpu for the CPU-only run" >&2
  exit 2
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
work="$here/.gpu_check/$stamp"
mkdir -p "$work"
export GC_PY=$py GC_MODE=$mode GC_WORK=$work
if [ "$mode" = gpu ]; then
  export SFD_FAST_CUDA_JIT=0  # a failed build stage is not retried as a JIT build inside later stages
  unset TRITON_INTERPRET      # real kernels, not the interpreter
fi

selected() {
  local s=$1
  [ "$s" = report ] && return 0
  [ "$s" = wheels ] && [ "$install" = 0 ] && return 1
  if [ -n "$only" ] && [[ ",$only," != *",$s,"* ]]; then return 1; fi
  if [ -n "$skip_list" ] && [[ ",$skip_list," == *",$s,"* ]]; then return 1; fi
  return 0
}

record() { "$py" "$here/gpu_check.py" record "$work" "$@" || echo "gpu_check: could not record stage $1" >&2; }

run_stage() {  # name budget-seconds
  local name=$1 budget
  budget=$(awk -v b="$2" -v s="$scale" 'BEGIN { printf "%d", b * s }')
  if ! selected "$name"; then
    echo "== $name: SKIPPED (not selected)"
    record "$name" SKIPPED 0 "$budget" "not selected (--only / --skip / --no-install)"
    return 0
  fi
  local log="$work/$name.log" start rc=0 status reason=""
  start=$(date +%s)
  echo "== $name (budget ${budget}s; log $log)"
  GC_DEADLINE=$((start + budget)) timeout --kill-after=2 "$budget" bash "$self" __stage "$name" >"$log" 2>&1 || rc=$?
  local seconds=$(($(date +%s) - start))
  case "$rc" in
    0) status=PASSED; [ ! -f "$work/$name.note" ] || reason=$(tr '\n' ' ' <"$work/$name.note") ;;
    77) status=SKIPPED; reason=$(cat "$work/$name.reason" 2>/dev/null || echo "skipped") ;;
    124 | 137) status=FAILED; reason="timed out after ${budget}s (budget)" ;;
    *) status=FAILED; reason="exit $rc: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)" ;;
  esac
  echo "   $status in ${seconds}s${reason:+: $reason}"
  record "$name" "$status" "$seconds" "$budget" "$reason"
}

echo "gpu_check: $mode mode, python $py, work dir $work"
run_stage wheels 60
run_stage build 85
run_stage tests 75
run_stage kernels 45
run_stage train_step 65
run_stage t2i_step 25
run_stage cuda_graph 45
run_stage inference 40

rc=0
report_budget=$(awk -v s="$scale" 'BEGIN { printf "%d", 10 * s }')
timeout --kill-after=5 "$report_budget" "$py" "$here/gpu_check.py" report --work "$work" --mode "$mode" \
  ${out:+--out "$out"} || {
  echo "gpu_check: the report failed; stage results:" >&2
  cat "$work/stages.jsonl" >&2
  rc=1
}
if grep -q '"status": "FAILED"' "$work/stages.jsonl"; then
  echo "gpu_check: at least one stage FAILED (logs in $work)" >&2
  rc=1
fi
exit $rc
