#!/usr/bin/env bash
# The engine's C code on aarch64 without an ARM machine: installs a cross compiler and
# qemu-user where missing (Debian/Ubuntu), then runs tests/arm/test_arm.py, which builds
# csrc/ (without the Python bindings) and driver.c statically for aarch64, runs it under
# qemu-aarch64 as a Cortex-A72 (Pi 4), a Cortex-A76 (Pi 5) and `max`, and checks the logits
# of int8, int4 and 16-bit bundles against a float64 Llama. Prints which kernel set each CPU
# model ran. Usage: bash tests/arm/run.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if ((${#missing[@]})); then
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}"
fi

python=${PYTHON:-$(command -v python3)}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}
"$python" -m pytest tests/arm/test_arm.py -q -s -p no:cacheprovider "$@" 2>&1 | grep --line-buffered -v '^Writing model shards'
