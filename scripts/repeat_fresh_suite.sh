#!/usr/bin/env bash
# Run the full test suite N times in a row, each in a fresh clone of HEAD (what CI does), and
# print one line per run: exit code, pytest's summary line, wall time. Stops at the first failure.
#   bash scripts/repeat_fresh_suite.sh [N=5] [--clean-home]
# --clean-home: the first run also builds its virtual environment from nothing under a new HOME
# (later runs reuse that cache, keyed by the dependency files, as CI's machine does).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
n=${1:-5}
work=$(mktemp -d /tmp/sfd-fresh-XXXXXX)
if [ "${2:-}" = "--clean-home" ]; then export HOME="$work/home"; mkdir -p "$HOME"; fi  # else: $HOME as given
commit=$(git -C "$root" rev-parse --short HEAD)
echo "commit $commit, $n fresh runs under $work (HOME=$HOME)"
for i in $(seq 1 "$n"); do
  clone="$work/clone-$i"
  git clone -q "$root" "$clone"
  start=$(date +%s)
  set +e
  (cd "$clone" && CI=true bash .ci/run) > "$work/run-$i.log" 2>&1
  rc=$?
  set -e
  summary=$(grep -E '[0-9]+ (passed|failed).* in [0-9.]+s' "$work/run-$i.log" | tail -1 || true)
  echo "run $i: exit $rc, $(( $(date +%s) - start )) s, $summary"
  if [ "$rc" -ne 0 ]; then echo "log: $work/run-$i.log"; exit "$rc"; fi
  rm -rf "$clone"
done
