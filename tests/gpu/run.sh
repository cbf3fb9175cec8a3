#!/usr/bin/env bash
# The GPU check (issue 21), from the repository root, on a fresh CUDA box:
#   bash tests/gpu/run.sh                 # < 8 min on an H100; prints one table, exit 1 on a failed check
#   bash tests/gpu/run.sh --cpu-dry-run   # the same steps on the CPU with tiny shapes (CI runs this)
# bitsandbytes comes from .whl/ (filled as tests/gpu/README.md says) when the interpreter
# lacks it, installed into a temporary folder; edgepack itself runs from this checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
target=$(mktemp -d "${TMPDIR:-/tmp}/edgepack-gpu-site-XXXXXX")
trap 'rm -rf "$target"' EXIT
if ! "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
    wheel=$(ls .whl/bitsandbytes-*.whl 2>/dev/null | sort | tail -n 1 || true)
    if [ -z "$wheel" ]; then
        echo "error: bitsandbytes is not installed and .whl/ holds no bitsandbytes wheel" >&2
        echo "hint: fill .whl/ with the pip download command in tests/gpu/README.md, then run again" >&2
        exit 2
    fi
    # --no-deps: its dependencies (torch, numpy, packaging) come with torch; no registry here.
    if ! "$PY" -m pip install -q --no-deps --no-index --target "$target" "$wheel" 2>/dev/null; then
        "$PY" -m zipfile -e "$wheel" "$target"   # a wheel is a zip of what it installs
    fi
    echo "[gpu-check] bitsandbytes from $wheel" >&2
fi
export PYTHONPATH="$PWD:$target${PYTHONPATH:+:$PYTHONPATH}"
# edgepack's CPU engine (edgepack._native) for the CPU-side references, when this box can
# compile it; without it the runtime runs those bundles through torch (same results).
if ! "$PY" -c "import edgepack._native" >/dev/null 2>&1; then
    if timeout 120 "$PY" setup.py -q build_ext --inplace >/dev/null 2>&1; then
        echo "[gpu-check] built edgepack._native" >&2
    else
        echo "[gpu-check] edgepack._native not built (no compiler or headers): CPU references run on torch" >&2
    fi
fi
exec "$PY" tests/gpu/check.py "$@"
