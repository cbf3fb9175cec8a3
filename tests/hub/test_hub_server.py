"""The real huggingface_hub client against the fake Hub in hub_server.py.

These tests pin what edgepack's Hub tests rely on: every call below is the client's own code path
(preupload, LFS batch + PUT, NDJSON commit, tree listing, HEAD + GET /resolve with Range).
"""

import hashlib
import json
import subprocess
import sys

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from hub_server import DEFAULT_TOKEN, DEFAULT_USER, LFS_THRESHOLD_BYTES, hub, hub_env, hub_server  # noqa: F401

REPO = f"{DEFAULT_USER}/tiny"
BIG_BYTES = 12 * 1024 * 1024  # above the 10 MB LFS threshold, so the client must take the LFS path


@pytest.fixture(scope="module")
def big_payload() -> bytes:
    # Not all-zeros: a stuck or reordered chunk would still compare equal in a file of zeros.
    return hashlib.sha256(b"seed").digest() * (BIG_BYTES // 32)


@pytest.fixture
def folder(tmp_path, big_payload):
    """A bundle-like folder: one small json, one 12 MB binary, one sub-folder."""
    root = tmp_path / "bundle"
    (root / "extra").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"bits": 4}))
    (root / "weights.dat").write_bytes(big_payload)
    (root / "extra" / "a.txt").write_text("a")
    (root / "extra" / "b.txt").write_text("b")
    return root


@pytest.fixture
def pushed(hub, folder) -> str:
    """REPO created and `folder` uploaded in one commit; returns that commit's sha."""
    api = HfApi()
    api.create_repo(REPO)
    return api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add bundle").oid


def test_server_binds_loopback_only(hub_server):
    assert hub_server.url.startswith("http://127.0.0.1:")


def test_create_repo_and_exist_ok(hub):
    api = HfApi()
    url = api.create_repo(REPO)
    assert url.repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    # Like the Hub, a new repo already has a commit holding .gitattributes.
    info = api.repo_info(REPO)
    assert len(info.sha) == 40 and [s.rfilename for s in info.siblings] == [".gitattributes"]


def test_upload_folder_small_and_big_file_in_one_commit(pushed, hub, big_payload):
    api = HfApi()
    assert sorted(api.list_repo_files(REPO)) == [
        ".gitattributes", "config.json", "extra/a.txt", "extra/b.txt", "weights.dat",
    ]
    commits = [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]
    lfs_puts = [r for r in hub.requests if r[0] == "PUT"]
    assert len(commits) == 1 and len(lfs_puts) == 1

    info = {f.path: f for f in api.get_paths_info(REPO, ["config.json", "weights.dat", "extra"])}
    assert info["weights.dat"].lfs.sha256 == hashlib.sha256(big_payload).hexdigest()
    assert info["weights.dat"].size == BIG_BYTES > LFS_THRESHOLD_BYTES
    assert info["config.json"].lfs is None
    assert info["extra"].tree_id  # a RepoFolder

    assert api.repo_info(REPO).sha == pushed
    with open(hf_hub_download(REPO, "weights.dat"), "rb") as f:
        assert f.read() == big_payload
    with open(hf_hub_download(REPO, "config.json")) as f:
        assert json.load(f) == {"bits": 4}


def test_unchanged_files_are_not_uploaded_again(pushed, hub, folder):
    hub.requests.clear()
    HfApi().upload_folder(repo_id=REPO, folder_path=folder)  # preupload answers each file's current oid
    assert not [r for r in hub.requests if r[0] == "PUT" or "/commit/" in r[1]]


def test_list_repo_tree_and_expand(pushed, hub):
    api = HfApi()
    top = {e.path for e in api.list_repo_tree(REPO)}
    assert top == {".gitattributes", "config.json", "weights.dat", "extra"}
    assert {e.path for e in api.list_repo_tree(REPO, path_in_repo="extra")} == {"extra/a.txt", "extra/b.txt"}
    expanded = {e.path: e for e in api.list_repo_tree(REPO, recursive=True, expand=True)}
    assert expanded["weights.dat"].last_commit.oid == pushed
    assert expanded["weights.dat"].last_commit.title == "add bundle"
    assert api.file_exists(REPO, "config.json") and not api.file_exists(REPO, "nope.json")


def test_branch_upload_and_snapshot_by_branch_and_sha(pushed, hub, tmp_path):
    api = HfApi()
    with pytest.raises(RevisionNotFoundError):  # like the Hub: the branch must exist first
        api.upload_file(path_or_fileobj=b"v1", path_in_repo="note.txt", repo_id=REPO, revision="v1")
    api.create_branch(REPO, branch="v1")
    branch_sha = api.upload_file(path_or_fileobj=b"v1", path_in_repo="note.txt", repo_id=REPO, revision="v1").oid

    assert "note.txt" in api.list_repo_files(REPO, revision="v1")
    assert "note.txt" not in api.list_repo_files(REPO)
    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert refs == {"main": pushed, "v1": branch_sha}

    by_branch = snapshot_download(REPO, revision="v1", local_dir=tmp_path / "v1")
    assert (tmp_path / "v1" / "note.txt").read_bytes() == b"v1" and by_branch == str(tmp_path / "v1")
    by_sha = snapshot_download(REPO, revision=pushed)
    assert by_sha.endswith(pushed)  # the cache's snapshots/<sha> folder
    assert sorted(p.name for p in (tmp_path / "v1").iterdir() if not p.name.startswith(".")) == [
        "config.json", "extra", "note.txt", "weights.dat",
    ]
    with open(hf_hub_download(REPO, "note.txt", revision=branch_sha), "rb") as f:
        assert f.read() == b"v1"


def test_not_found_errors(pushed, hub):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(f"{DEFAULT_USER}/missing")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json")


def test_private_repo_needs_a_token(hub, tmp_path):
    api = HfApi()
    api.create_repo(REPO, private=True)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=REPO)

    # As on the Hub: 401 + X-Error-Code RepoNotFound, which the client raises as RepositoryNotFoundError
    # (not its subclass GatedRepoError).
    with pytest.raises(RepositoryNotFoundError) as err:
        HfApi(token=False).repo_info(REPO)
    assert type(err.value) is RepositoryNotFoundError and err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as missing:  # a missing repo looks the same
        HfApi(token=False).repo_info(f"{DEFAULT_USER}/missing")
    assert missing.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json", token=False, cache_dir=tmp_path / "anon")

    assert api.repo_info(REPO).private is True
    assert open(hf_hub_download(REPO, "config.json"), "rb").read() == b"{}"
    assert api.whoami()["name"] == DEFAULT_USER
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").repo_info(REPO)
    assert err.value.response.status_code == 401 and not isinstance(err.value, RepositoryNotFoundError)


def test_corrupted_file_is_served_with_the_original_etag(pushed, hub, big_payload):
    hub.corrupt(REPO, "weights.dat")
    with open(hf_hub_download(REPO, "weights.dat"), "rb") as f:
        served = f.read()
    # The client does not check content hashes: spotting this is edgepack's job.
    assert len(served) == len(big_payload) and served != big_payload
    assert sum(a != b for a, b in zip(served, big_payload)) == 1
    lfs = HfApi().get_paths_info(REPO, "weights.dat")[0].lfs
    assert lfs.sha256 == hashlib.sha256(big_payload).hexdigest()


def test_dropped_download_resumes_with_a_range_request(pushed, hub, big_payload):
    # The client keeps only whole 10 MiB chunks of a dropped body, so drop after more than one.
    dropped_at = 11_000_000
    hub.fail_after("weights.dat", dropped_at)
    with open(hf_hub_download(REPO, "weights.dat"), "rb") as f:
        assert f.read() == big_payload
    [(path, range_header)] = hub.ranges
    assert path == f"/{REPO}/resolve/main/weights.dat"
    assert 0 < int(range_header.removeprefix("bytes=").removesuffix("-")) <= dropped_at


def test_failed_download_then_second_download_completes(pushed, hub, big_payload):
    hub.fail_after("weights.dat", 1_000_000, then_status=500)
    with pytest.raises(HfHubHTTPError):
        hf_hub_download(REPO, "weights.dat")
    with open(hf_hub_download(REPO, "weights.dat"), "rb") as f:
        assert f.read() == big_payload


def test_delete_folder_in_a_later_commit(pushed, hub):
    api = HfApi()
    api.create_commit(
        REPO,
        operations=[CommitOperationDelete("extra/"), CommitOperationAdd("extra2/c.txt", b"c")],
        commit_message="drop extra",
    )
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "config.json", "extra2/c.txt", "weights.dat"]
    assert "extra/a.txt" in api.list_repo_files(REPO, revision=pushed)  # history keeps it
    assert [c.title for c in api.list_repo_commits(REPO)] == ["drop extra", "add bundle", "initial commit"]


def test_hub_env_drives_a_subprocess(pushed, hub, tmp_path):
    script = (
        "from huggingface_hub import HfApi, constants;"
        "assert constants.HF_HUB_DISABLE_XET;"
        f"print(HfApi().repo_info({REPO!r}).sha)"
    )
    env = hub_env(hub, tmp_path / "sub_home", token=DEFAULT_TOKEN)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == pushed
