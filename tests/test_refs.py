"""edgepack.format.refs: one answer to "a bundle folder, or a Hub repo?" for run, serve, plan, pull and load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.errors import HubError
from edgepack.format.refs import RepoRef, bundle_ref, is_local_path, is_model_id, parse_repo_ref


def test_repo_spellings_name_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder called "me" here
    assert bundle_ref("me/smollm2-edge") == RepoRef("me/smollm2-edge", None)
    assert bundle_ref("me/smollm2-edge@v2") == RepoRef("me/smollm2-edge", "v2")
    assert bundle_ref("hf://me/smollm2-edge") == RepoRef("me/smollm2-edge", None)
    assert bundle_ref("hf://me/smollm2-edge@refs/pr/1") == RepoRef("me/smollm2-edge", "refs/pr/1")
    assert str(bundle_ref("hf://me/smollm2-edge@v2")) == "me/smollm2-edge@v2"
    assert parse_repo_ref("hf://me/x/") == ("me/x", None)


def test_paths_stay_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me" / "smollm2-edge").mkdir(parents=True)
    assert bundle_ref("me/smollm2-edge") == Path("me/smollm2-edge")  # a folder of that name wins
    assert bundle_ref("./you/b") == Path("./you/b")
    assert bundle_ref("/srv/you/b") == Path("/srv/you/b")
    assert bundle_ref("~/b") == Path("~/b").expanduser()
    assert bundle_ref("mybundle") == Path("mybundle")  # no slash: no repo id; load says it is missing
    assert bundle_ref("a/b/c") == Path("a/b/c")  # two slashes: a path
    assert bundle_ref(Path("you/b")) == Path("you/b")  # a path object is never a repo
    assert is_local_path("me") and is_local_path("./nothing") and not is_local_path("you/b")


@pytest.mark.parametrize("ref", ["hf://", "hf://me", "hf://me/a/b", "hf://-me/x", "owner/na me"])
def test_malformed_repo_references(ref):
    if ref.startswith("hf://"):
        with pytest.raises(HubError, match="is not a Hub repo reference") as err:
            bundle_ref(ref)
        assert "owner/name@revision" in err.value.hint
    else:
        assert bundle_ref(ref) == Path(ref)
    with pytest.raises(HubError):
        parse_repo_ref(ref)


def test_model_ids_allow_bare_names():
    assert is_model_id("gpt2") and is_model_id("HuggingFaceTB/SmolLM2-135M")
    assert not is_model_id("a/b/c") and not is_model_id("-x") and not is_model_id("a b")


def test_refs_imports_nothing_of_the_hub():
    code = (
        "import sys, edgepack.format.refs; "
        "print(sorted(m for m in sys.modules if m.startswith(('edgepack.hub', 'huggingface_hub', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
