"""`pull` hashes what it downloaded with progress on a terminal (as `verify` and `run` do), and
hashes it once: with --key, the signature is checked over the manifest the files were just
hashed against, not by hashing them all again."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from hub_server import DEFAULT_USER, hub, hub_env, hub_server  # noqa: F401

from edgepack import hub as edgehub
from edgepack.format import bundle as bundle_format
from edgepack.format import signing
from edgepack.hub.download import pull

REPO = Path(__file__).resolve().parents[2]
CHILD = ("import sys\n"
         "from edgepack.format import verify\n"
         "verify.HashProgress.MIN_BYTES, verify.HashProgress.INTERVAL_S = 0, 0\n"
         "from edgepack.cli import main\n"
         "raise SystemExit(main(sys.argv[1:]))\n")


def test_pull_reports_hashing_up_to_the_manifest_total(hub, packed, tmp_path):
    bundle = packed("llama", 8)
    edgehub.push(bundle, f"{DEFAULT_USER}/progress")
    calls: list[tuple[int, int]] = []
    result = pull(f"{DEFAULT_USER}/progress", out=tmp_path / "out", hash_progress=lambda d, t: calls.append((d, t)))
    total = sum(e["size"] for e in bundle_format.read_manifest(result.path)["files"])
    assert calls and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)  # it only goes forward
    assert {t for _, t in calls} == {total}


def run_on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.DEVNULL, stderr=slave,
                            env={**env, "PYTHONPATH": str(REPO)})
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


def test_pull_on_a_terminal_shows_hashing_once_even_with_a_key(hub_server, hub, bundle_copy, tmp_path):
    bundle = bundle_copy("llama", 8)
    _, public, _ = signing.generate_key(tmp_path / "key.pem")
    signing.sign(bundle, tmp_path / "key.pem")
    edgehub.push(bundle, f"{DEFAULT_USER}/signed")
    env = hub_env(hub_server, tmp_path / "hf_home_child", token=None)
    code, err = run_on_a_terminal(["pull", f"{DEFAULT_USER}/signed", "-o", str(tmp_path / "out"),
                                   "--key", str(public)], env)
    assert code == 0, err
    shown = [int(p) for p in re.findall(r"hashing [0-9]+ / [0-9]+ MB \(([0-9]+)%\)", err)]
    assert shown and shown[-1] == 100, repr(err)
    assert shown == sorted(shown), repr(err)  # hashed once: the key check does not read the weights again
    assert "sizes and sha256 match" in err
    code, err = run_on_a_terminal(["pull", f"{DEFAULT_USER}/signed", "-o", str(tmp_path / "quiet"), "-q"], env)
    assert code == 0 and "hashing" not in err, err
