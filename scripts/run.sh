#!/usr/bin/env bash
# The two set-up commands of the README, on a fresh machine:
#   bash scripts/run.sh demo [sfd-fast demo options]   # end-to-end demo on the embedded data set
#   bash scripts/run.sh test [pytest options]          # the test suite (what CI runs)
# Builds a virtual environment on first use, cached outside the clone and keyed by the
# dependency files (override the location with SFD_FAST_VENV). torch==2.13.0 (CPU) goes in
# first: with no torch present, pip would resolve the unpinned requirement to a multi-GB CUDA build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
what=${1:-}
case "$what" in demo|test) shift ;; *) echo "usage: $0 demo|test [options]" >&2; exit 2 ;; esac

key=$(cat "$root/pyproject.toml" "$root/setup.py" "$root/scripts/run.sh" | sha256sum | cut -c1-16)
venv=${SFD_FAST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sfd_fast/venv-$key}
# pip here warns about every unused local index entry: keep real errors, drop that noise.
pip_q() { "$venv/bin/pip" install -q "$@" 2> >(grep -v '^WARNING: Location' >&2); }
if [ ! -f "$venv/.complete" ]; then
  echo "sfd_fast: building the environment in $venv (first run only)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  pip_q --upgrade pip "setuptools>=68" wheel
  pip_q "torch==${SFD_FAST_TORCH:-2.13.0}"
  pip_q --no-build-isolation -e "$root[dev]"
  touch "$venv/.complete"
fi
# The cached environment may have been built from another clone: point it at this one.
SFD_FAST_SKIP_CUDA_BUILD=${SFD_FAST_SKIP_CUDA_BUILD:-1} \
  pip_q --no-build-isolation --no-deps -e "$root"

cd "$root"
if [ "$what" = demo ]; then
  exec "$venv/bin/sfd-fast" demo "$@"
fi
exec "$venv/bin/python" -m pytest -q --durations=12 "$@"
