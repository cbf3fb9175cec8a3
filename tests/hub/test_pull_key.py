"""`pull --key`: a bundle the key did not sign is refused before any weight is fetched, and
leaves nothing behind (no folder at -o, no weights in the Hub cache or edgepack's)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hub_server import DEFAULT_USER, hub, hub_server  # noqa: F401

from edgepack import cli
from edgepack import hub as edgehub
from edgepack.errors import SignatureError
from edgepack.format import signing
from edgepack.hub.download import pull


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    _, public, _ = signing.generate_key(root / "good.pem")
    _, other_public, _ = signing.generate_key(root / "other.pem")
    return {"private": root / "good.pem", "public": public, "other_public": other_public}


def weights_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*.safetensors")]


def caches(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "hf_home", Path(os.environ["EDGEPACK_CACHE"])


@pytest.mark.parametrize("case", ["other-key", "unsigned", "garbage-sig", "forged"])
def test_refused_pull_leaves_nothing_behind(case, hub, bundle_copy, keys, tmp_path, capsys):
    bundle = bundle_copy("llama", 8)
    repo = f"{DEFAULT_USER}/{case}"
    if case != "unsigned":
        signing.sign(bundle, keys["private"])
    if case == "garbage-sig":
        (bundle / "edgepack.sig").write_text("not a signature")
    if case == "forged":  # a signature over another manifest
        sig = json.loads((bundle / "edgepack.sig").read_text())
        manifest = bundle / "edgepack.json"
        manifest.write_text(manifest.read_text().replace('"bits": 8', '"bits":  8', 1))
        (bundle / "edgepack.sig").write_text(json.dumps(sig))
    edgehub.push(bundle, repo)
    key = keys["other_public"] if case == "other-key" else keys["public"]
    out = tmp_path / "pulled"
    assert cli.main(["pull", repo, "-o", str(out), "--key", str(key)]) != 0
    err = capsys.readouterr().err
    assert len([ln for ln in err.splitlines() if ln.startswith("error: ")]) == 1 and "Traceback" not in err
    expected = {"other-key": "was signed by key", "unsigned": "is not signed", "garbage-sig": "malformed",
                "forged": "does not match its edgepack.json"}[case]
    assert expected in err
    assert not out.exists()
    assert weights_under(*caches(tmp_path)) == []  # nothing fetched beyond the manifest and signature
    # without -o: edgepack's cache gets no folder either
    assert cli.main(["pull", repo, "--key", str(key)]) != 0
    edgepack_hub = caches(tmp_path)[1] / "hub"
    assert not edgepack_hub.exists() or not any(edgepack_hub.rglob("edgepack.json"))
    assert weights_under(*caches(tmp_path)) == []


def test_signed_pull_with_the_key_downloads_and_verifies(hub, bundle_copy, keys, tmp_path):
    bundle = bundle_copy("llama", 8)
    signing.sign(bundle, keys["private"])
    edgehub.push(bundle, f"{DEFAULT_USER}/good")
    said = []
    result = pull(f"{DEFAULT_USER}/good", out=tmp_path / "a", key=keys["public"], progress=said.append)
    assert (result.path / "edgepack.sig").is_file() and weights_under(result.path)
    assert any("signed by the given key" in s for s in said)
    with pytest.raises(SignatureError):
        pull(f"{DEFAULT_USER}/good", out=tmp_path / "b", key=keys["other_public"])
    assert not (tmp_path / "b").exists()
