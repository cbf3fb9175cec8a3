"""A local stand-in for the Hugging Face Hub, so tests run the real `huggingface_hub` client offline.

The server is standard library only (the fixtures at the bottom use pytest). It answers the HTTP calls that
`huggingface_hub` (2.x, read from its source) makes for repo creation, commits (regular files and the LFS
batch flow), branches, listings and downloads, with the headers and `X-Error-Code` values the client turns
into its exception classes. It binds 127.0.0.1 on a random free port and keeps file bytes in a temporary
folder; repos, branches and commits live in memory.

Scope, on purpose:
- Model repos only (`/api/models/...`); dataset and space calls get 400. Repo ids must be `namespace/name`.
- No Xet: the server never sends `X-Xet-*` headers and preupload answers only "regular" or "lfs". The client
  must run with `HF_HUB_DISABLE_XET=1` (`hub_env` / `patch_hub` do it), else it tries Xet storage we lack.
- No pull requests (`create_pr` gets 400), no tags, no multipart LFS, no gitignore handling.
- Auth has no per-user permissions: any token in `server.tokens` reads and writes every repo. Anonymous
  callers read public repos only. A token that is not in `server.tokens` gets 401 on every call.
- Like the real Hub, a new repo starts with one commit holding `.gitattributes`, and committing to a branch
  that does not exist is an error: call `create_branch` first.

What the client raises (checked in tests/hub/test_hub_server.py):
- unknown repo                      -> RepositoryNotFoundError (401 anonymous, 404 with a token)
- private repo without a token      -> RepositoryNotFoundError (401 + X-Error-Code RepoNotFound, as the Hub)
- unknown revision                  -> RevisionNotFoundError (404 + X-Error-Code RevisionNotFound)
- unknown file                      -> RemoteEntryNotFoundError (404 + X-Error-Code EntryNotFound)
- token not in `server.tokens`      -> HfHubHTTPError with status 401 ("Invalid credentials ...")
- create_repo on an existing repo   -> HfHubHTTPError with status 409 (swallowed by `exist_ok=True`)

Use in tests (in-process; `hub` is defined at the bottom of this file):

    from hub_server import hub, hub_server  # noqa: F401  (or put this line in tests/conftest.py)

    def test_push(hub):
        HfApi().create_repo("edgepack-tester/m")   # talks to `hub.url` with `DEFAULT_TOKEN`

or in a subprocess: `subprocess.run(cmd, env=hub_env(server, tmp_path / "hf_home", token=DEFAULT_TOKEN))`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest

DEFAULT_TOKEN = "hf_edgepack_test_token"
DEFAULT_USER = "edgepack-tester"

# The Hub refuses regular (non-LFS) git blobs at or above 10 MB; preupload sends those files through LFS.
LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
_CHUNK_BYTES = 64 * 1024

# The LFS patterns of the `.gitattributes` the Hub puts in every new model repo (abridged).
_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tar.*", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS).encode()

# Variables the client reads at import time or per call; a stale one would point it at the real Hub,
# a real token or a shared cache. `hub_env` drops them from the inherited environment.
_CLIENT_ENV_VARS = (
    "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
    "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "HF_HUB_ENABLE_HF_TRANSFER", "HF_XET_HIGH_PERFORMANCE", "HUGGINGFACE_CO_STAGING",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
)


class _HttpError(Exception):
    """An error answer: status, message, and the `X-Error-Code` the client maps to an exception class."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}


@dataclass(frozen=True)
class _Blob:
    """One file version. `key` names the bytes under objects/; `corrupt` swaps it, never the hashes."""

    size: int
    sha256: str
    git_oid: str  # git blob sha1 of the content, or of the LFS pointer for LFS files
    lfs: bool
    pointer_size: int
    key: str

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class _Commit:
    sha: str
    parent: str | None
    files: dict[str, _Blob]
    title: str
    message: str
    date: str
    author: str


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)


@dataclass
class _Failure:
    path_suffix: str
    nbytes: int
    then_status: int | None
    dropped: bool = False


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _upload_mode(path: str, size: int, sample: bytes) -> str:
    """The Hub's rule: LFS for big files, for `.gitattributes` patterns, and for binary content."""
    name = path.rsplit("/", 1)[-1]
    if size >= LFS_THRESHOLD_BYTES or b"\0" in sample:
        return "lfs"
    return "lfs" if any(fnmatch.fnmatch(name, p) for p in _LFS_PATTERNS) else "regular"


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _HttpError(400, f"Invalid path in repo: {path!r}")
    return path


def _folders(files: dict[str, _Blob]) -> set[str]:
    return {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}


def _under(path: str, folder: str) -> bool:
    return folder == "" or path.startswith(folder + "/")


def _folder_oid(files: dict[str, _Blob], folder: str) -> str:
    listing = "".join(f"{p} {b.git_oid}\n" for p, b in sorted(files.items()) if _under(p, folder))
    return hashlib.sha1(listing.encode()).hexdigest()


class HubServer:
    """The fake Hub. Start it with `with HubServer() as server:` (or `start()`/`stop()`).

    Test hooks: `corrupt`, `fail_after`, `requests` (every (method, path) served, query string dropped)
    and `ranges` ((path, Range header) of every ranged download).
    """

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens: dict[str, str] = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str]] = []
        self._repos: dict[str, _Repo] = {}
        self._failures: list[_Failure] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._tmp: str | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def objects_dir(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp) / "objects"

    def start(self) -> HubServer:
        self._tmp = tempfile.mkdtemp(prefix="edgepack-hub-")
        self.objects_dir.mkdir()
        # Loopback only: this server has no real auth and must never be reachable from elsewhere.
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # idle keep-alive connections must not block stop()
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None
        with self._lock:
            # Close idle keep-alive connections too: the client's pool would otherwise keep talking to
            # this stopped server if a later one happens to get the same port.
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- test hooks -------------------------------------------------------------------------------------

    def corrupt(self, repo_id: str, path: str, revision: str = "main", offset: int | None = None) -> None:
        """Flip one byte of the stored file; etag, sha256, size and listings keep advertising the original.

        Every commit of `repo_id` that holds the same version of `path` serves the damaged bytes.
        """
        with self._lock:
            repo = self._repos[repo_id]
            blob = self._resolve(repo, revision).files[path]
            if blob.size == 0:
                raise ValueError(f"{path} is empty: nothing to corrupt")
            data = bytearray((self.objects_dir / blob.key).read_bytes())
            data[blob.size // 2 if offset is None else offset] ^= 0x01
            key = f"corrupt-{hashlib.sha1(bytes(data)).hexdigest()}"
            (self.objects_dir / key).write_bytes(bytes(data))
            damaged = _Blob(blob.size, blob.sha256, blob.git_oid, blob.lfs, blob.pointer_size, key)
            for commit in repo.commits.values():
                if commit.files.get(path) == blob:
                    commit.files[path] = damaged

    def fail_after(self, path_suffix: str, nbytes: int, *, then_status: int | None = None) -> None:
        """Make the next GET of a file whose `repo_id/path` ends with `path_suffix` send `nbytes` of its
        body, then drop the connection.

        The client retries a dropped download by itself (after 1 s), so a single `hf_hub_download` still
        completes. It resumes with a Range request from the last whole 10 MiB chunk it wrote
        (`constants.DOWNLOAD_CHUNK_SIZE`); below that it starts again from byte 0. With `then_status`
        (e.g. 500) that retry is answered with this status instead, so the first `hf_hub_download` fails
        and only a second one gets the file.
        """
        with self._lock:
            self._failures.append(_Failure(path_suffix, nbytes, then_status))

    # --- state (callers hold self._lock) ----------------------------------------------------------------

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        sha = repo.branches.get(revision, revision)
        if sha not in repo.commits:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def _store(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.objects_dir / sha256
        if not target.exists():
            tmp = target.with_name(f"{sha256}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return sha256

    def _regular_blob(self, data: bytes) -> _Blob:
        sha256 = self._store(data)
        return _Blob(len(data), sha256, _git_oid(data), False, 0, sha256)

    def _lfs_blob(self, sha256: str, size: int | None) -> _Blob:
        stored = self.objects_dir / sha256
        if not stored.exists():
            raise _HttpError(422, f"LFS object {sha256} was never uploaded: upload it before the commit")
        actual = stored.stat().st_size
        if size is not None and size != actual:
            raise _HttpError(422, f"LFS object {sha256} has {actual} bytes, commit says {size}")
        pointer = _lfs_pointer(sha256, actual)
        return _Blob(actual, sha256, _git_oid(pointer), True, len(pointer), sha256)

    def _add_commit(self, repo: _Repo, branch: str, files: dict[str, _Blob], title: str, message: str,
                    author: str) -> _Commit:
        parent = repo.branches.get(branch)
        self._commit_counter += 1
        seed = json.dumps([repo.repo_id, parent, title, _folder_oid(files, ""), self._commit_counter])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        commit = _Commit(sha, parent, files, title, message, _now(), author)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    def _last_commit(self, repo: _Repo, commit: _Commit, path: str, is_folder: bool) -> _Commit:
        """The newest commit in `commit`'s history that changed `path`."""

        def signature(c: _Commit):
            return _folder_oid(c.files, path) if is_folder else c.files.get(path)

        while commit.parent is not None and signature(repo.commits[commit.parent]) == signature(commit):
            commit = repo.commits[commit.parent]
        return commit


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the `_h_*` methods; each one names the `huggingface_hub` function that calls it."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server_version = "edgepack-fake-hub/1"

    _R = r"(?P<repo>[^/]+/[^/]+?)"
    _ROUTES = [
        ("POST", r"/api/repos/create", "_h_create_repo"),
        ("DELETE", r"/api/repos/delete", "_h_delete_repo"),
        ("GET", r"/api/whoami-v2", "_h_whoami"),
        ("POST", r"/api/validate-yaml", "_h_validate_yaml"),
        ("GET", rf"/api/models/{_R}", "_h_repo_info"),
        ("GET", rf"/api/models/{_R}/revision/(?P<rev>[^/]+)", "_h_repo_info"),
        ("GET", rf"/api/models/{_R}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "_h_tree"),
        ("POST", rf"/api/models/{_R}/paths-info/(?P<rev>[^/]+)", "_h_paths_info"),
        ("POST", rf"/api/models/{_R}/preupload/(?P<rev>[^/]+)", "_h_preupload"),
        ("POST", rf"/api/models/{_R}/commit/(?P<rev>[^/]+)", "_h_commit"),
        ("POST", rf"/api/models/{_R}/branch/(?P<branch>[^/]+)", "_h_create_branch"),
        ("DELETE", rf"/api/models/{_R}/branch/(?P<branch>[^/]+)", "_h_delete_branch"),
        ("GET", rf"/api/models/{_R}/refs", "_h_refs"),
        ("GET", rf"/api/models/{_R}/commits/(?P<rev>[^/]+)", "_h_commits"),
        ("POST", rf"/{_R}\.git/info/lfs/objects/batch", "_h_lfs_batch"),
        ("POST", rf"/{_R}\.git/info/lfs/objects/verify", "_h_lfs_verify"),
        ("PUT", r"/__lfs__/(?P<oid>[0-9a-f]{64})", "_h_lfs_put"),
        ("GET", rf"/{_R}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_h_resolve"),
        ("HEAD", rf"/{_R}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_h_resolve"),
    ]
    _COMPILED = [(m, re.compile(p + "$"), h) for m, p, h in _ROUTES]

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self):
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # tests read `server.requests`; stderr noise helps nobody

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # --- plumbing ---------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        self._responded = False
        raw_path, _, query = self.path.partition("?")
        self.query = parse_qs(query)
        with self.hub._lock:
            self.hub.requests.append((method, unquote(raw_path)))
        try:
            if raw_path.startswith(("/api/datasets/", "/api/spaces/", "/datasets/", "/spaces/")):
                raise _HttpError(400, "This test Hub hosts model repos only")
            for route_method, pattern, handler in self._COMPILED:
                match = pattern.match(raw_path)
                if match and route_method == method:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    getattr(self, handler)(**args)
                    return
            raise _HttpError(404, f"No route for {method} {raw_path}")
        except _HttpError as err:
            body = json.dumps({"error": err.message}).encode()
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.error_code is not None:
                headers["X-Error-Code"] = err.error_code
            self._send(err.status, body, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as err:  # a bug here should reach the test as an error answer, not a hang
            self.close_connection = True
            if not self._responded:
                self._send(500, json.dumps({"error": f"test Hub bug: {err!r}"}).encode())

    def send_response(self, code, message=None):
        self._responded = True
        super().send_response(code, message)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        if not self._body_read and self.command in ("POST", "PUT", "DELETE"):
            # We answer before reading the request body: the connection cannot be reused.
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # HEAD answers carry headers only
            self.wfile.write(body)

    def _send_json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _iter_body(self):
        """Yield the request body, plain or chunked (the client streams LFS uploads from files)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield from self._read_exact(size)
                self.rfile.readline()  # CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
        else:
            yield from self._read_exact(int(self.headers.get("Content-Length") or 0))
        self._body_read = True

    def _read_exact(self, nbytes: int):
        while nbytes > 0:
            chunk = self.rfile.read(min(nbytes, _CHUNK_BYTES))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            nbytes -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> dict:
        try:
            return json.loads(self._body() or b"{}")
        except json.JSONDecodeError as err:
            raise _HttpError(400, f"Body is not JSON: {err}") from err

    def _base_url(self) -> str:
        # Answer with the host the client used, so URLs we hand out (LFS upload hrefs) reach us again.
        return f"http://{self.headers.get('Host') or self.hub.url.removeprefix('http://')}"

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            # The Hub's wording; the client keys on it to raise a plain 401 instead of RepoNotFound.
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _repo(self, repo_id: str, *, write: bool = False) -> tuple[_Repo, str | None]:
        """The repo and the caller; hides private repos from anonymous callers exactly like missing ones."""
        user = self._user()
        repo = self.hub._repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            # The Hub answers 401 to anonymous callers so that private repos do not leak their existence.
            raise _HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and user is None:
            raise _HttpError(401, "Authentication required to write to this repo", "RepoNotFound")
        return repo, user

    def _branch(self, repo: _Repo, rev: str) -> str:
        if "create_pr" in self.query:
            raise _HttpError(400, "This test Hub does not support pull requests")
        if rev not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {rev} (create the branch first)", "RevisionNotFound")
        return rev

    def _file_entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict:
        blob = commit.files[path]
        entry = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        if expand:
            entry["lastCommit"] = self._commit_stub(self.hub._last_commit(repo, commit, path, False))
        return entry

    def _folder_entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict:
        entry = {"type": "directory", "oid": _folder_oid(commit.files, path), "path": path}
        if expand:
            entry["lastCommit"] = self._commit_stub(self.hub._last_commit(repo, commit, path, True))
        return entry

    @staticmethod
    def _commit_stub(commit: _Commit) -> dict:
        return {"id": commit.sha, "title": commit.title, "date": commit.date}

    # --- account and repos ------------------------------------------------------------------------------

    def _h_whoami(self) -> None:
        """`HfApi.whoami` (GET /api/whoami-v2)."""
        user = self._user()
        if user is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        role = {"displayName": "edgepack-test", "role": "write"}
        self._send_json({"type": "user", "id": user, "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": role}})

    def _h_validate_yaml(self) -> None:
        """`HfApi._validate_yaml`, called by `create_commit` when a README.md is committed."""
        self._body()
        self._send_json({"errors": [], "warnings": []})

    def _h_create_repo(self) -> None:
        """`HfApi.create_repo` (POST /api/repos/create). 409 still carries "url": `exist_ok` reads it."""
        payload = self._json_body()
        user = self._user()
        if user is None:
            raise _HttpError(401, "You must be authenticated to create a repo")
        if payload.get("type", "model") != "model":
            raise _HttpError(400, "This test Hub hosts model repos only")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise _HttpError(400, f"Invalid repo id {repo_id!r}")
        url = f"{self._base_url()}/{repo_id}"
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        with self.hub._lock:
            if repo_id in self.hub._repos:
                self._send_json({"error": "You already created this model repo", "url": url}, 409)
                return
            repo = _Repo(repo_id, private, _now())
            self.hub._repos[repo_id] = repo
            files = {".gitattributes": self.hub._regular_blob(_GITATTRIBUTES)}
            self.hub._add_commit(repo, "main", files, "initial commit", "", user)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _h_delete_repo(self) -> None:
        """`HfApi.delete_repo` (DELETE /api/repos/delete)."""
        payload = self._json_body()
        user = self._user()
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        with self.hub._lock:
            self._repo(repo_id, write=True)
            del self.hub._repos[repo_id]
        self._send_json({})

    def _h_repo_info(self, repo: str, rev: str = "main") -> None:
        """`HfApi.repo_info` / `model_info` (GET /api/models/{repo_id}[/revision/{rev}]), also the
        first call of `snapshot_download`. `blobs=1` (files_metadata=True) adds sizes and LFS info."""
        with self.hub._lock:
            repo_obj, _ = self._repo(repo)
            commit = self.hub._resolve(repo_obj, rev)
            with_blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
            siblings = []
            for path, blob in sorted(commit.files.items()):
                sibling: dict = {"rfilename": path}
                if with_blobs:
                    sibling.update(size=blob.size, blobId=blob.git_oid)
                    if blob.lfs:
                        lfs = {"size": blob.size, "sha256": blob.sha256, "pointerSize": blob.pointer_size}
                        sibling["lfs"] = lfs
                siblings.append(sibling)
            info = {
                "_id": repo_obj.repo_id, "id": repo_obj.repo_id, "modelId": repo_obj.repo_id,
                "author": repo_obj.repo_id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
                "createdAt": repo_obj.created_at, "private": repo_obj.private, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            }
        self._send_json(info)

    # --- branches and history ---------------------------------------------------------------------------

    def _h_create_branch(self, repo: str, branch: str) -> None:
        """`HfApi.create_branch` (POST /api/models/{repo_id}/branch/{branch}); 409 if it exists."""
        payload = self._json_body()
        with self.hub._lock:
            repo_obj, _ = self._repo(repo, write=True)
            if branch in repo_obj.branches:
                raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
            start = self.hub._resolve(repo_obj, payload.get("startingPoint") or "main")
            repo_obj.branches[branch] = start.sha
        self._send_json({})

    def _h_delete_branch(self, repo: str, branch: str) -> None:
        """`HfApi.delete_branch` (DELETE /api/models/{repo_id}/branch/{branch})."""
        self._body()
        with self.hub._lock:
            repo_obj, _ = self._repo(repo, write=True)
            if branch == "main" or branch not in repo_obj.branches:
                raise _HttpError(400 if branch == "main" else 404, f"Cannot delete branch {branch}")
            del repo_obj.branches[branch]
        self._send_json({})

    def _h_refs(self, repo: str) -> None:
        """`HfApi.list_repo_refs` (GET /api/models/{repo_id}/refs)."""
        with self.hub._lock:
            repo_obj, _ = self._repo(repo)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                for name, sha in sorted(repo_obj.branches.items())
            ]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _h_commits(self, repo: str, rev: str) -> None:
        """`HfApi.list_repo_commits` (GET /api/models/{repo_id}/commits/{rev}), newest first, one page."""
        with self.hub._lock:
            repo_obj, _ = self._repo(repo)
            commit: _Commit | None = self.hub._resolve(repo_obj, rev)
            items = []
            while commit is not None:
                items.append({"id": commit.sha, "authors": [{"user": commit.author}], "date": commit.date,
                              "title": commit.title, "message": commit.message})
                commit = repo_obj.commits[commit.parent] if commit.parent else None
        self._send_json(items)

    # --- listings ---------------------------------------------------------------------------------------

    def _h_tree(self, repo: str, rev: str, path: str = "") -> None:
        """`HfApi.list_repo_tree` / `list_repo_files` and `snapshot_download`'s listing
        (GET /api/models/{repo_id}/tree/{rev}[/{path}]?recursive=&expand=); everything in one page."""
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        folder = path.strip("/")
        with self.hub._lock:
            repo_obj, _ = self._repo(repo)
            commit = self.hub._resolve(repo_obj, rev)
            folders = _folders(commit.files)
            if folder and folder not in folders:
                raise _HttpError(404, f"Folder {folder!r} not found", "EntryNotFound")

            def listed(p: str) -> bool:
                rest = p[len(folder) + 1 :] if folder else p
                return _under(p, folder) and p != folder and (recursive or "/" not in rest)

            entries = [self._folder_entry(repo_obj, commit, d, expand) for d in sorted(folders) if listed(d)]
            entries += [self._file_entry(repo_obj, commit, f, expand) for f in sorted(commit.files) if listed(f)]
        self._send_json(entries)

    def _h_paths_info(self, repo: str, rev: str) -> None:
        """`HfApi.get_paths_info` (POST /api/models/{repo_id}/paths-info/{rev}, form-encoded
        `paths` + `expand`), also used by `create_commit` for copies. Missing paths are left out."""
        body = self._body()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            payload = json.loads(body or b"{}")
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[0].lower() == "true"
        with self.hub._lock:
            repo_obj, _ = self._repo(repo)
            commit = self.hub._resolve(repo_obj, rev)
            folders = _folders(commit.files)
            entries = []
            for path in (p.strip("/") for p in paths):
                if path in commit.files:
                    entries.append(self._file_entry(repo_obj, commit, path, expand))
                elif path in folders:
                    entries.append(self._folder_entry(repo_obj, commit, path, expand))
        self._send_json(entries)

    # --- uploads ----------------------------------------------------------------------------------------

    def _h_preupload(self, repo: str, rev: str) -> None:
        """`_commit_api._fetch_upload_modes`, from `HfApi.preupload_lfs_files` / `create_commit`
        (POST /api/models/{repo_id}/preupload/{rev}). Never answers "xet"; "oid" lets the client skip
        unchanged files (sha256 for LFS files, git sha1 for regular ones, as `_local_oid` computes)."""
        payload = self._json_body()
        with self.hub._lock:
            repo_obj, _ = self._repo(repo, write=True)
            head = self.hub._resolve(repo_obj, self._branch(repo_obj, rev))
            answers = []
            for item in payload.get("files", []):
                path = _check_path(item["path"])
                mode = _upload_mode(path, int(item["size"]), base64.b64decode(item.get("sample", "")))
                existing = head.files.get(path)
                oid = None if existing is None else (existing.sha256 if mode == "lfs" else existing.git_oid)
                answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answers, "commitOid": head.sha})

    def _h_lfs_batch(self, repo: str) -> None:
        """`lfs.post_lfs_batch_info`, from `_commit_api._upload_files`
        (POST /{repo_id}.git/info/lfs/objects/batch).

        Basic transfer only (no `chunk_size` => single PUT). Objects already stored get no "actions",
        which the client reads as "already uploaded"."""
        payload = self._json_body()
        with self.hub._lock:
            self._repo(repo, write=True)
        if payload.get("operation") != "upload":
            raise _HttpError(400, "This test Hub only supports LFS uploads; download through /resolve/")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int):
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "oid must be a sha256 hex digest"}})
                continue
            stored = self.hub.objects_dir / oid
            if stored.exists() and stored.stat().st_size == size:
                objects.append({"oid": oid, "size": size})
                continue
            actions = {
                "upload": {"href": f"{self._base_url()}/__lfs__/{oid}"},
                "verify": {"href": f"{self._base_url()}/{repo}.git/info/lfs/objects/verify"},
            }
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _h_lfs_put(self, oid: str) -> None:
        """`lfs._upload_single_part` (PUT to the href from the batch answer). Like a presigned storage URL
        it needs no token; unlike S3 it checks the sha256, so a bad upload fails here, not at download."""
        hasher = hashlib.sha256()
        tmp = self.hub.objects_dir / f"{oid}.{threading.get_ident()}.upload"
        with open(tmp, "wb") as out:
            for chunk in self._iter_body():
                hasher.update(chunk)
                out.write(chunk)
        if hasher.hexdigest() != oid:
            tmp.unlink()
            raise _HttpError(400, f"Uploaded bytes have sha256 {hasher.hexdigest()}, expected {oid}")
        os.replace(tmp, self.hub.objects_dir / oid)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _h_lfs_verify(self, repo: str) -> None:
        """`lfs.lfs_upload`'s verify step (POST to the "verify" href): the object exists with that size."""
        payload = self._json_body()
        stored = self.hub.objects_dir / str(payload.get("oid"))
        if not stored.exists() or stored.stat().st_size != payload.get("size"):
            raise _HttpError(404, f"LFS object {payload.get('oid')} of {payload.get('size')} bytes not found")
        self._send_json({"success": True})

    def _h_commit(self, repo: str, rev: str) -> None:
        """`_commit_api._send_commit`, from `HfApi.create_commit` / `upload_file` / `upload_folder` /
        `delete_file` / `delete_folder` (POST /api/models/{repo_id}/commit/{rev}, NDJSON: one "header"
        line, then "file" (base64), "lfsFile", "deletedFile" or "deletedFolder" lines)."""
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "A commit starts with a header line")
        header = lines[0]["value"]
        with self.hub._lock:
            repo_obj, user = self._repo(repo, write=True)
            branch = self._branch(repo_obj, rev)
            head = self.hub._resolve(repo_obj, branch)
            parent = header.get("parentCommit")
            if parent is not None and parent != head.sha:
                raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                path = _check_path(path.rstrip("/") if key in ("deletedFile", "deletedFolder") else path)
                if key == "file":
                    data = base64.b64decode(value["content"])
                    if len(data) >= LFS_THRESHOLD_BYTES:
                        raise _HttpError(400, f"{path}: files of 10 MB or more must go through LFS")
                    files[path] = self.hub._regular_blob(data)
                elif key == "lfsFile":
                    files[path] = self.hub._lfs_blob(value["oid"], value.get("size"))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise _HttpError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise _HttpError(400, f"Unknown commit operation {key!r}")
            commit = self.hub._add_commit(
                repo_obj, branch, files, header.get("summary", ""), header.get("description", ""), user
            )
        url = f"{self._base_url()}/{repo}/commit/{commit.sha}"
        self._send_json({"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None})

    # --- downloads --------------------------------------------------------------------------------------

    def _h_resolve(self, repo: str, rev: str, path: str) -> None:
        """`file_download.get_hf_file_metadata` (HEAD) and `http_get` (GET, with Range to resume), from
        `hf_hub_download`, `snapshot_download` and `HfApi.file_exists` (/{repo_id}/resolve/{rev}/{path}).

        The etag is the sha256 for LFS files (with X-Linked-Etag/X-Linked-Size, which the client prefers)
        and the git blob sha1 otherwise. The real Hub redirects LFS downloads to a CDN; we serve them here."""
        with self.hub._lock:
            repo_obj, _ = self._repo(repo)
            commit = self.hub._resolve(repo_obj, rev)
            blob = commit.files.get(path)
            if blob is None:
                # X-Repo-Commit lets the client cache the absence of the file for this commit.
                raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
            failure = next((f for f in self.hub._failures if f"{repo}/{path}".endswith(f.path_suffix)), None)
            if failure is not None and self.command == "GET" and failure.dropped:
                self.hub._failures.remove(failure)
                raise _HttpError(failure.then_status, "Injected failure after a dropped download")
            if failure is not None and self.command == "GET":
                failure.dropped = True
                if failure.then_status is None:
                    self.hub._failures.remove(failure)
        headers = {"ETag": f'"{blob.etag}"', "X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})

        start, end = 0, blob.size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header is not None and self.command == "GET":
            with self.hub._lock:
                self.hub.ranges.append((f"/{repo}/resolve/{rev}/{path}", range_header))
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if match and match.group(1) + match.group(2):  # a single range; others get the whole file
                first, last = match.groups()
                start = int(first) if first else max(blob.size - int(last), 0)
                end = min(int(last), blob.size - 1) if first and last else blob.size - 1
                if start >= blob.size or start > end:
                    unsatisfiable = {"Content-Range": f"bytes */{blob.size}"}
                    raise _HttpError(416, "Range Not Satisfiable", headers=unsatisfiable)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"

        length = end - start + 1 if blob.size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        budget = failure.nbytes if failure is not None else length
        with open(self.hub.objects_dir / blob.key, "rb") as src:
            src.seek(start)
            remaining = min(length, budget)
            while remaining > 0:
                chunk = src.read(min(remaining, _CHUNK_BYTES))
                self.wfile.write(chunk)
                remaining -= len(chunk)
        if failure is not None:
            # Drop the connection mid-body, as a network cut would.
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


# --- pointing the client at the server ------------------------------------------------------------------


def _hub_vars(server: HubServer, hf_home: str | Path, token: str | None) -> dict[str, str]:
    hub_vars = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_XET": "1",  # the server has no Xet storage
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    if token is not None:
        hub_vars["HF_TOKEN"] = token
    return hub_vars


def hub_env(server: HubServer, hf_home: str | Path, token: str | None = None,
            base: dict[str, str] | None = None) -> dict[str, str]:
    """A whole environment for a subprocess that runs the client against `server`.

    `base` (default `os.environ`) minus every variable that could point the client at the real Hub, a real
    token or a shared cache, plus HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET=1, HF_HUB_DISABLE_TELEMETRY=1 and
    HF_TOKEN when `token` is given. A subprocess reads these at import, which is the robust route for code
    (transformers, say) that copies `huggingface_hub.constants` at its own import.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _CLIENT_ENV_VARS}
    return {**env, **_hub_vars(server, hf_home, token)}


def patch_hub(monkeypatch: pytest.MonkeyPatch, server: HubServer, hf_home: str | Path,
              token: str | None = None) -> None:
    """Point the already-imported client at `server` for one test; `monkeypatch` undoes it all.

    `huggingface_hub.constants` reads the environment once, at import, and the module-level `HfApi` behind
    `huggingface_hub.create_repo` & co. copied `constants.ENDPOINT` when it was built; so setting
    HF_ENDPOINT alone is too late and both are patched here. Functions read `constants.X` per call.
    """
    from huggingface_hub import constants, hf_api

    for name in _CLIENT_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in _hub_vars(server, hf_home, token).items():
        monkeypatch.setenv(name, value)

    hf_home = str(hf_home)
    patched = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": os.path.join(hf_home, "hub"),
        "HUGGINGFACE_HUB_CACHE": os.path.join(hf_home, "hub"),
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HUGGINGFACE_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(hf_home, ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": os.path.join(hf_home, ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": os.path.join(hf_home, ".agent_harnesses.json"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_OFFLINE": False,
    }
    for name, value in patched.items():
        # raising=False: older clients lack some of these names, and setting an unused one is harmless.
        monkeypatch.setattr(constants, name, value, raising=False)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)


@pytest.fixture
def hub_server():
    """A fresh, empty fake Hub for one test (starting one takes milliseconds)."""
    with HubServer() as server:
        yield server


@pytest.fixture
def hub(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """`hub_server` with the in-process client pointed at it, logged in as `DEFAULT_USER` via HF_TOKEN,
    caching under `tmp_path / "hf_home"`."""
    patch_hub(monkeypatch, hub_server, tmp_path / "hf_home", token=DEFAULT_TOKEN)
    return hub_server
