"""`edgepack verify`, and the first load of `run`, show hashing progress on stderr when it is
a terminal, and only then: not into a pipe, not with -q. The 64 MB threshold is lowered in
the child so the tiny bundle counts as large."""

from __future__ import annotations

from pathlib import Path

import pytest
from terminal import run_cli


def verify_with_stderr(bundle: Path, *flags: str, tty: bool, command: tuple[str, ...] = ("verify",)) -> tuple[int, str]:
    return run_cli([command[0], str(bundle), *command[1:], *flags], tty)


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
