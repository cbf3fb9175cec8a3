"""`pull` hashes what it downloaded with progress on a terminal (as `verify` and `run` do), and
hashes it once: with --key, the signature is checked over the manifest the files were just
hashed against, not by hashing them all again."""

from __future__ import annotations

import re

from hub_server import DEFAULT_USER, hub, hub_env, hub_server  # noqa: F401
from terminal import run_cli

from edgepack import hub as edgehub
from edgepack.format import bundle as bundle_format
from edgepack.format import signing
from edgepack.hub.download import pull


def test_pull_reports_hashing_up_to_the_manifest_total(hub, packed, tmp_path):
    bundle = packed("llama", 8)
    edgehub.push(bundle, f"{DEFAULT_USER}/progress")
    calls: list[tuple[int, int]] = []
    result = pull(f"{DEFAULT_USER}/progress", out=tmp_path / "out", hash_progress=lambda d, t: calls.append((d, t)))
    total = sum(e["size"] for e in bundle_format.read_manifest(result.path)["files"])
    assert calls and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)  # it only goes forward
    assert {t for _, t in calls} == {total}


def test_pull_on_a_terminal_shows_hashing_once_even_with_a_key(hub_server, hub, bundle_copy, tmp_path):
    bundle = bundle_copy("llama", 8)
    _, public, _ = signing.generate_key(tmp_path / "key.pem")
    signing.sign(bundle, tmp_path / "key.pem")
    edgehub.push(bundle, f"{DEFAULT_USER}/signed")
    env = hub_env(hub_server, tmp_path / "hf_home_child", token=None)
    code, err = run_cli(["pull", f"{DEFAULT_USER}/signed", "-o", str(tmp_path / "out"), "--key", str(public)],
                        tty=True, env=env)
    assert code == 0, err
    shown = [int(p) for p in re.findall(r"hashing [0-9]+ / [0-9]+ MB \(([0-9]+)%\)", err)]
    assert shown and shown[-1] == 100, repr(err)
    assert shown == sorted(shown), repr(err)  # hashed once: the key check does not read the weights again
    assert "sizes and sha256 match" in err
    code, err = run_cli(["pull", f"{DEFAULT_USER}/signed", "-o", str(tmp_path / "quiet"), "-q"], tty=True, env=env)
    assert code == 0 and "hashing" not in err, err
