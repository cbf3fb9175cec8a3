"""The box's install beside the workstation's: size of each virtual environment, and the
time to the first token (from process start) and peak RSS of a fresh process that loads a
bundle and generates one token, from each.

    python tests/bench/minimal_install.py BUNDLE --minimal /path/to/venv/bin/python \\
        [--full .venv/bin/python] [--repeats 5]

The minimal venv is `python -m venv V && V/bin/pip install .` (no extras); the figures
should match, since the engine imports no torch either way. Runs alternate between the two
(this machine is shared and noisy); medians are printed. PYTHONPATH (a checkout) applies to
the full install only: the minimal one runs what pip installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = """
import json, os, sys, time
t0 = float(os.environ["EDGEPACK_BENCH_T0"])
import edgepack
lm = edgepack.load(sys.argv[1])
next(iter(lm.stream("The capital of France is", max_new_tokens=1, temperature=0)))
first = time.time() - t0
status = open("/proc/self/status").read()
hwm_kib = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1])
print(json.dumps({"first_token_s": first, "peak_rss_kib": hwm_kib, "backend": lm.backend,
                  "torch": "torch" in sys.modules}))
"""


def tree_bytes(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def run_once(python: str, bundle: str, keep_path: bool) -> dict:
    drop = ("PYTHONDONTWRITEBYTECODE",) if keep_path else ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["EDGEPACK_BENCH_T0"] = repr(time.time())
    done = subprocess.run([python, "-c", WORKER, bundle], capture_output=True, text=True, env=env, cwd="/")
    if done.returncode != 0:
        raise SystemExit(f"{python} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--minimal", required=True, help="python of the venv with `pip install .` (no extras)")
    ap.add_argument("--full", default=str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    pythons = {"minimal": args.minimal, "full": args.full}
    runs: dict[str, list[dict]] = {name: [] for name in pythons}
    for name, python in pythons.items():
        run_once(python, args.bundle, name == "full")  # warm-up: page cache, bytecode, the verified-hash record
    for _ in range(args.repeats):
        for name, python in pythons.items():
            runs[name].append(run_once(python, args.bundle, name == "full"))
    print(f"{'install':8} {'venv MB':>8} {'first token s':>14} {'peak RSS MiB':>13}  backend, torch imported")
    for name, python in pythons.items():
        prefix = Path(subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                                     text=True, check=True).stdout.strip())
        first = statistics.median(r["first_token_s"] for r in runs[name])
        rss = statistics.median(r["peak_rss_kib"] for r in runs[name]) / 1024
        print(f"{name:8} {tree_bytes(prefix) / 1e6:8.0f} {first:14.3f} {rss:13.1f}  "
              f"{runs[name][-1]['backend']}, {runs[name][-1]['torch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
