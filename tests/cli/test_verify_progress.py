"""`edgepack verify`, and the first load of `run`, show hashing progress on stderr when it is
a terminal, and only then: not into a pipe, not with -q. The 64 MB threshold is lowered in
the child so the tiny bundle counts as large."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHILD = ("import sys\n"
         "from edgepack.format import verify\n"
         "verify.HashProgress.MIN_BYTES, verify.HashProgress.INTERVAL_S = 0, 0\n"
         "from edgepack.cli import main\n"
         "raise SystemExit(main(sys.argv[1:]))\n")


def verify_with_stderr(bundle: Path, *flags: str, tty: bool, command: tuple[str, ...] = ("verify",)) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-c", CHILD, command[0], str(bundle), *command[1:], *flags]
    if not tty:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        return done.returncode, done.stderr
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, env=env)
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


@pytest.mark.parametrize("flags,tty,shown", [((), True, True), ((), False, False), (("-q",), True, False)])
def test_hashing_progress_only_on_a_terminal(packed, flags, tty, shown):
    code, err = verify_with_stderr(packed("llama", 8), *flags, tty=tty)
    assert code == 0
    assert ("hashing" in err and "(100%)" in err) is shown, err
    if shown:  # the line is cleared when hashing ends
        assert err.rstrip(" ").endswith("\r")


@pytest.mark.parametrize("flags,tty,shown", [((), True, True), ((), False, False), (("-q",), True, False)])
def test_first_load_of_run_shows_hashing_progress_only_on_a_terminal(bundle_copy, flags, tty, shown):
    bundle = bundle_copy("llama", 8)  # a copy: never loaded, so its first load hashes every file
    code, err = verify_with_stderr(bundle, *flags, tty=tty,
                                   command=("run", "Hello", "--max-new-tokens", "2", "--temperature", "0"))
    assert code == 0, err
    assert ("hashing" in err and "(100%)" in err) is shown, err
