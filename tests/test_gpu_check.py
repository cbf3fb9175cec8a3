"""The GPU check's CPU dry run (tests/gpu/run.sh --cpu-dry-run): every step of the CUDA
check that can run without a GPU, so the script is not first exercised on one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_and_names_what_it_skips(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", "tests/gpu/run.sh", "--cpu-dry-run", "--work", str(tmp_path / "work")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.count(" | ") == 4]
    results = {r[4].strip() for r in rows[1:]}
    assert results <= {"PASS", "SKIP", "info"}
    checks = {(r[0].strip(), r[1].strip()) for r in rows if r[4].strip() == "PASS"}
    for bundle in ("small-8bit", "small-nf4", "large-8bit", "large-nf4", "small-t4-8bit", "large-4gb-card"):
        assert (bundle, "pack + verify") in checks
    for bundle in ("small-8bit", "small-nf4", "large-8bit", "large-nf4", "small-t4-8bit"):
        assert (bundle, "logits vs float32 source") in checks
    assert ("small-t4-8bit", "no bf16: float16 storage + compute") in checks
    assert ("small-8bit", "split map: logits vs all-GPU") in checks
    assert ("large-4gb-card", "4 GB card: planner's choice") in checks
    skipped = [r for r in rows if r[4].strip() == "SKIP"]
    assert skipped and all("CUDA only" in r[3] for r in skipped)
    assert "CPU dry run:" in done.stdout and ", 0 failed," in done.stdout


def test_gpu_check_refuses_without_cuda_or_dry_run(tmp_path):
    """On a box without CUDA the real check stops at once with a hint, not half-way."""
    import torch

    if torch.cuda.is_available():
        return
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", "tests/gpu/run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "error: no CUDA device" in done.stderr and "--cpu-dry-run" in done.stderr
