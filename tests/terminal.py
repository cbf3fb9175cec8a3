"""The CLI in a child process whose stderr is a pseudo-terminal, for what edgepack shows only
on a terminal (hashing progress). The child lowers HashProgress's 64 MB threshold and its
0.2 s interval, so a tiny bundle's hashing shows every step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = ("import sys\n"
         "from edgepack.format import verify\n"
         "verify.HashProgress.MIN_BYTES, verify.HashProgress.INTERVAL_S = 0, 0\n"
         "from edgepack.cli import main\n"
         "raise SystemExit(main(sys.argv[1:]))\n")


def run_cli(argv: list[str], tty: bool, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(exit code, everything written to stderr) of `edgepack ARGV`, stderr a terminal or a pipe."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", CHILD, *argv]
    if not tty:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        return done.returncode, done.stderr
    master, slave = os.openpty()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")
