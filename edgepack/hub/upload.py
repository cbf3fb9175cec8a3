"""``push``: a verified bundle to a Hub repo, with the variant index and the model card, in one commit.

With ``variant`` the bundle goes to ``VARIANT/`` and replaces only that folder; without, it sits
at the repo root. huggingface_hub is imported inside the functions that use it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from edgepack.errors import EdgepackError, HubError
from edgepack.format import bundle as bundle_format
from edgepack.format.refs import parse_repo_ref
from edgepack.hub.failures import hub_error, hub_exceptions
from edgepack.hub.variants import (
    INDEX_NAME,
    check_index,
    check_variant_name,
    index_entries,
    load_index_json,
    new_index,
    read_remote_manifest,
    variant_entry,
)

CARD_NAME = "README.md"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str  # the branch written
    variant: str | None  # None: the bundle sits at the repo root
    commit_sha: str
    commit_url: str
    files_uploaded: int  # files of the new bundle (unchanged ones are not sent again)
    files_deleted: int  # files of the replaced bundle that the new one does not have


def push(
    bundle_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    variant: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
) -> PushResult:
    """Verify a bundle, then upload it to ``repo_id`` in one commit with the index and card.

    With ``variant`` the bundle goes to ``VARIANT/`` and replaces only that folder; without,
    it sits at the repo root (replacing the root bundle, if any). The repo is created if
    needed (``private`` applies only then); ``revision`` is a branch, created from main if new.
    """
    say = progress or (lambda _msg: None)
    if variant is not None:
        check_variant_name(variant)
    repo_id, at_revision = parse_repo_ref(repo_id)
    if at_revision:
        raise HubError(f"push takes a repo id without @{at_revision}", hint=f"pass --revision {at_revision}")
    bundle = Path(bundle_dir)
    say(f"verifying {bundle} (sizes and sha256 of every file)")
    manifest = bundle_format.verify_bundle(bundle, check_hashes=True)
    names = [e["path"] for e in manifest["files"]] + [n for n in bundle_format.UNLISTED_FILES if (bundle / n).is_file()]
    prefix = f"{variant}/" if variant else ""
    branch = revision or "main"
    try:
        return _push(bundle, manifest, names, repo_id, prefix, variant, branch, private, commit_message, token, say)
    except hub_exceptions() as exc:
        if isinstance(exc, EdgepackError):
            raise
        raise hub_error(exc, repo_id, branch, token, writing=True) from exc


def _push(bundle, manifest, names, repo_id, prefix, variant, branch, private, commit_message, token, say) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from edgepack.hub.modelcard import render_card

    api = HfApi(token=token)
    say(f"creating {repo_id} if needed")
    api.create_repo(repo_id, private=private, exist_ok=True)
    if branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    head = api.repo_info(repo_id, revision=branch).sha
    remote = set(api.list_repo_files(repo_id, revision=head))
    index = _index_for_push(api, repo_id, head, remote)

    entry = variant_entry(manifest, variant)
    entry["pushed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if variant is None:
        old = set(_root_bundle_files(api, repo_id, head, remote))
        index["root"] = entry
    else:
        old = {p for p in remote if p.startswith(prefix)}
        index["variants"] = sorted([v for v in index["variants"] if v["name"] != variant] + [entry],
                                   key=lambda v: v["name"])
    new = {prefix + n for n in names}
    doomed = sorted(old - new)
    card = render_card(repo_id, index_entries(index))
    operations = [CommitOperationDelete(path_in_repo=p) for p in doomed]
    operations += [CommitOperationAdd(path_in_repo=prefix + n, path_or_fileobj=str(bundle / n)) for n in names]
    operations.append(CommitOperationAdd(path_in_repo=INDEX_NAME, path_or_fileobj=_json_bytes(index)))
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode("utf-8")))

    quant = manifest["quantization"]
    where = f"variant {variant}" if variant else "bundle at the root"
    total = sum(e["size"] for e in manifest["files"])
    message = commit_message or f"edgepack: push {where} ({quant['bits']}-bit {quant['scheme']}, {total / 1e6:.1f} MB)"
    say(f"uploading {len(names)} files ({total / 1e6:.1f} MB) to {repo_id}@{branch}/{prefix} in one commit"
        + (f", removing {len(doomed)} old files" if doomed else ""))
    info = api.create_commit(repo_id, operations, commit_message=message, revision=branch, parent_commit=head)
    return PushResult(repo_id, branch, variant, info.oid, info.commit_url, len(names), len(doomed))


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def _index_for_push(api, repo_id: str, head: str, remote: set[str]) -> dict[str, Any]:
    """The repo's index at ``head``; rebuilt from the root manifest for a repo pushed without one."""
    if INDEX_NAME in remote:
        path = api.hf_hub_download(repo_id, INDEX_NAME, revision=head)
        return check_index(load_index_json(path, f"{repo_id}/{INDEX_NAME}"), f"{repo_id}/{INDEX_NAME}")
    index = new_index()
    if bundle_format.MANIFEST_NAME in remote:
        path = api.hf_hub_download(repo_id, bundle_format.MANIFEST_NAME, revision=head)
        index["root"] = variant_entry(read_remote_manifest(path, repo_id), None)
    return index


def _root_bundle_files(api, repo_id: str, head: str, remote: set[str]) -> list[str]:
    """The files of the bundle now at the repo root (from its manifest), to replace them."""
    if bundle_format.MANIFEST_NAME not in remote:
        return []
    path = api.hf_hub_download(repo_id, bundle_format.MANIFEST_NAME, revision=head)
    manifest = read_remote_manifest(path, repo_id)
    listed = [e["path"] for e in manifest["files"]] + list(bundle_format.UNLISTED_FILES)
    return [p for p in listed if p in remote]
