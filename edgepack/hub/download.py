"""``pull``: one bundle of a Hub repo, downloaded, verified, and put in a folder of plain files.

Downloads go through huggingface_hub's cache (HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply),
restricted to the chosen variant's files; the bundle is then linked (or copied) into a
directory of plain files and every file is hashed against ``edgepack.json`` before ``pull``
returns. A failed or damaged download is never handed to the runtime: the next pull resumes
it, and a file whose hash is wrong is deleted from the cache so it is fetched afresh.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgepack.errors import BundleIntegrityError, EdgepackError, HubError, VariantError
from edgepack.format import bundle as bundle_format
from edgepack.format import staging
from edgepack.format.refs import HF_SCHEME, bundle_ref, parse_repo_ref
from edgepack.hub.failures import hub_error, hub_exceptions, is_transient
from edgepack.hub.variants import (
    INDEX_NAME,
    check_index,
    check_variant_name,
    choose_variant,
    fit,
    index_entries,
    load_index_json,
    new_index,
    read_remote_manifest,
    variant_entry,
)

# A dropped connection is retried by huggingface_hub itself; this covers what it gives up on
# (a 5xx, a second drop). Each attempt resumes from the bytes already in the cache.
DOWNLOAD_ATTEMPTS = 3
RETRY_DELAY_S = 2.0
_COMMIT_RE = re.compile(r"[0-9a-f]{40}\Z")
_REPLACE_HINT = "choose an empty or new folder with -o (pull replaces only an edgepack bundle)"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PullResult:
    path: Path  # a verified bundle directory, ready for edgepack.load
    repo_id: str
    commit: str  # the commit every file came from
    variant: str | None  # None: the bundle at the repo root
    reason: str  # why this variant, in a sentence


def resolve_bundle_ref(ref: str | os.PathLike, *, token: str | None = None, progress: Progress | None = None) -> Path:
    """A local bundle directory as is; a repo reference (edgepack.format.refs.bundle_ref) is
    pulled, the variant that fits this box chosen, verified, and its local path returned."""
    where = bundle_ref(ref)
    if isinstance(where, Path):
        return where  # edgepack.load explains a missing or broken local bundle
    text = str(ref)
    try:
        pulled = pull(str(where), auto=True, token=token, progress=progress, check_hashes="once")
    except HubError as exc:
        if text.startswith(HF_SCHEME):
            raise
        raise HubError(f"{exc.message} (and there is no local directory {text})", hint=exc.hint) from None
    if progress is not None:
        progress(f"variant: {pulled.reason}")
    return pulled.path



def pull(
    repo_ref: str,
    *,
    out: str | os.PathLike | None = None,
    variant: str | None = None,
    auto: bool = False,
    revision: str | None = None,
    token: str | None = None,
    profile=None,
    check_hashes: bool | str = True,
    progress: Progress | None = None,
    key: str | os.PathLike | None = None,
    hash_progress: Callable[[int, int], None] | None = None,
) -> PullResult:
    """Download one bundle of a Hub repo, verify every file, return where it is and why.

    ``repo_ref``: ``owner/name``, ``owner/name@revision`` or ``hf://...``. ``variant`` names a
    folder of the repo; ``auto`` (or a ``profile``) picks the best variant that fits this box
    (``edgepack.plan.profile.probe()``) or the given DeviceProfile. Neither: the root bundle, or
    the only variant. ``out``: the directory to write (default: under ~/.cache/edgepack/hub,
    or $EDGEPACK_CACHE/hub). ``check_hashes="once"`` trusts a copy already pulled and hashed
    whose files are unchanged since; fresh downloads are always hashed. ``key``: an Ed25519
    public key file; the bundle's signature over its manifest is checked before any weight
    is fetched, so a refused bundle leaves nothing behind. ``hash_progress(done_bytes,
    total_bytes)``: called as the pulled files are hashed.
    """
    say = progress or (lambda _msg: None)
    repo_id, ref_revision = parse_repo_ref(repo_ref)
    if revision and ref_revision and revision != ref_revision:
        raise HubError(f"two revisions given: @{ref_revision} and --revision {revision}", hint="give one")
    revision = revision or ref_revision or "main"
    if variant is not None and (auto or profile is not None):
        raise VariantError("give --variant NAME or --auto, not both", hint="--auto picks a variant for this box")
    if variant is not None:
        check_variant_name(variant)
    if out is not None:
        _check_out(Path(out))
    try:
        return _pull(repo_id, revision, out, variant, auto or profile is not None, token, profile, check_hashes, say,
                     key, hash_progress)
    except hub_exceptions() as exc:
        if isinstance(exc, EdgepackError):
            raise
        raise hub_error(exc, repo_id, revision, token) from exc


def _pull(repo_id, revision, out, variant, auto, token, profile, check_hashes, say, key=None,
          hash_progress=None) -> PullResult:
    say(f"reading {repo_id}@{revision}")
    index, commit = _read_repo(repo_id, revision, token)
    if auto and profile is None:
        from edgepack.plan.probe import probe
        from edgepack.plan.profile import DeviceProfile

        profile = DeviceProfile.from_dict(probe(check_bitsandbytes=False), origin="probe of this box")
    entry, reason = _pick(repo_id, index, variant, auto, profile)
    prefix = f"{entry['path']}/" if entry["path"] else ""
    manifest_path = _fetch(repo_id, prefix + bundle_format.MANIFEST_NAME, commit, token)
    if manifest_path is None:
        raise HubError(f"{repo_id} lists {prefix or 'a root bundle'} but has no {prefix}{bundle_format.MANIFEST_NAME}",
                       hint="push that variant again")
    manifest = read_remote_manifest(manifest_path, repo_id, prefix)
    if auto:
        _check_choice(repo_id, entry, manifest, profile)
    manifest_bytes = Path(manifest_path).read_bytes()
    if key is not None:
        _check_signature(repo_id, prefix, commit, token, manifest_bytes, key)
        say(f"{prefix or '(root)'} is signed by the given key")
    target = Path(out) if out is not None else _default_dir(repo_id, commit, entry["name"])

    existing = target / bundle_format.MANIFEST_NAME
    if existing.is_file() and existing.read_bytes() == manifest_bytes:
        try:
            bundle_format.verify_bundle(target, check_hashes=check_hashes, progress=hash_progress)
            say(f"{target} already holds this bundle, verified")
            return PullResult(target, repo_id, commit, entry["name"], reason)
        except EdgepackError:
            say(f"{target} holds a damaged copy; fetching it again")

    names = [e["path"] for e in manifest["files"]]
    total = sum(e["size"] for e in manifest["files"])
    say(f"downloading {len(names)} files ({total / 1e6:.1f} MB) of {repo_id}@{commit[:8]} {prefix or '(root)'}")
    patterns = [_glob_escape(prefix + n) for n in [*names, *bundle_format.UNLISTED_FILES]]
    snapshot = _download(repo_id, commit, patterns, token, say)
    say(f"verifying {len(names)} files against {bundle_format.MANIFEST_NAME}")
    _materialize(snapshot / prefix if prefix else snapshot, manifest, target, repo_id, hash_progress)
    return PullResult(target, repo_id, commit, entry["name"], reason)


def _check_signature(repo_id: str, prefix: str, commit: str, token, manifest_bytes: bytes, key) -> None:
    """The signature over the manifest, before any weight is fetched: the manifest holds every
    file's sha256, so a manifest the key signed vouches for the files checked against it."""
    from edgepack.errors import SignatureError
    from edgepack.format import signing

    what = f"{repo_id}@{commit[:8]} {prefix.rstrip('/') or '(root)'}"
    sig_path = _fetch(repo_id, prefix + bundle_format.SIGNATURE_NAME, commit, token)
    if sig_path is None:
        raise SignatureError(f"{what} is not signed (no {bundle_format.SIGNATURE_NAME}); nothing was downloaded",
                             hint="ask its publisher to sign it (`edgepack sign`), or pull without --key if you "
                             "trust it another way")
    with tempfile.TemporaryDirectory() as tmp:  # the cache's copy is a symlink, which read_signature refuses
        copy = Path(tmp) / bundle_format.SIGNATURE_NAME
        copy.write_bytes(Path(sig_path).read_bytes()[: signing.MAX_SIGNATURE_BYTES + 1])
        signature = signing.read_signature(tmp)
    signing.check_manifest_signature(manifest_bytes, signature, key, what)


def _check_choice(repo_id: str, entry: dict[str, Any], manifest: dict[str, Any], profile) -> None:
    """--auto chose from the index's figures: the manifest (whose hashes vouch for every file)
    must give the same ones, and must fit this box by its own figures too."""
    from edgepack.hub.modelcard import entry_label

    own = variant_entry(manifest, entry["name"])
    keys = ("bits", "weight_bytes")
    index_per_device = (entry.get("memory") or {}).get("weight_bytes_per_device")
    differ = [k for k in keys if entry.get(k) != own[k]]
    if index_per_device != own["memory"].get("weight_bytes_per_device"):
        differ.append("memory.weight_bytes_per_device")
    if differ:
        raise VariantError(
            f"{repo_id}: the index's figures for {entry_label(entry)} disagree with its "
            f"{bundle_format.MANIFEST_NAME} ({', '.join(differ)}), so --auto cannot trust them",
            hint="pull a variant by name with --variant NAME; its owner should push it again to rewrite the index",
        )
    checked = fit(own, profile)
    if not checked.fits:
        raise VariantError(f"{repo_id}: {entry_label(entry)} does not fit this box ({profile.name}) by its "
                           f"{bundle_format.MANIFEST_NAME}: it needs {checked.describe()}",
                           hint="free some memory, or take one anyway with --variant NAME")


def _read_repo(repo_id: str, revision: str, token) -> tuple[dict[str, Any], str]:
    """(index, commit sha), read at one commit. A repo without an index has a root bundle only."""
    commit = revision if _COMMIT_RE.match(revision) else None
    index_path = _fetch(repo_id, INDEX_NAME, commit or revision, token)
    if index_path is not None:
        commit = commit or _commit_of(index_path, INDEX_NAME)
        index = check_index(load_index_json(index_path, f"{repo_id}/{INDEX_NAME}"), f"{repo_id}/{INDEX_NAME}")
        return index, commit or revision
    manifest_path = _fetch(repo_id, bundle_format.MANIFEST_NAME, commit or revision, token)
    if manifest_path is None:
        raise HubError(
            f"{repo_id}@{revision} is not an edgepack repo: "
            f"it has neither {INDEX_NAME} nor {bundle_format.MANIFEST_NAME}",
            hint="check the repo id; publish a bundle with `edgepack push BUNDLE REPO_ID`",
        )
    commit = commit or _commit_of(manifest_path, bundle_format.MANIFEST_NAME)
    manifest = read_remote_manifest(manifest_path, repo_id)
    index = new_index()
    index["root"] = variant_entry(manifest, None)
    return index, commit or revision


def _fetch(repo_id: str, filename: str, revision: str, token) -> Path | None:
    """One file through the cache, or None when the repo has no such file at that revision."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision, token=token))
    except LocalEntryNotFoundError:
        # Offline (or unreachable): a file the Hub said was absent is remembered as such.
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
        if cached is not None and not isinstance(cached, str):
            return None
        raise
    except EntryNotFoundError:
        return None
    _check_cached(path, repo_id, filename)
    return path


def _check_cached(path: Path, repo_id: str, filename: str) -> None:
    """The cache names a blob after the Hub's etag: the sha256 of an LFS file, the git blob sha1
    of a small one. Check a small file we are about to trust (index, manifest) against it."""
    import hashlib

    blob = Path(os.path.realpath(path))
    data = blob.read_bytes()
    if len(blob.name) == 64:
        actual = hashlib.sha256(data).hexdigest()
    elif len(blob.name) == 40:
        actual = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    else:
        return  # a cache without blobs (no symlinks): the manifest's own checks still apply
    if actual != blob.name:
        _purge_cached(path)
        raise BundleIntegrityError(
            f"{repo_id}: {filename} downloaded from the Hub does not match the hash the Hub gives for it",
            hint="the damaged copy was removed from the cache: run the pull again to fetch it afresh",
        )


def _commit_of(path: Path, filename: str) -> str | None:
    """The commit of a file hf_hub_download returned: the cache keeps it at snapshots/<sha>/<filename>."""
    folder = Path(path).parents[filename.count("/")]
    return folder.name if _COMMIT_RE.match(folder.name) else None


def _pick(repo_id, index, variant, auto, profile) -> tuple[dict[str, Any], str]:
    variants = {v["name"]: v for v in index["variants"]}
    root = index.get("root")
    available = ", ".join(sorted(variants)) or "none"
    if variant is not None:
        if variant in variants:
            return variants[variant], f"{variant} was asked for (--variant)"
        extra = "; and a bundle at the root (pull without --variant)" if root else ""
        raise VariantError(f"{repo_id} has no variant {variant!r}; its variants: {available}{extra}",
                           hint="pick one of them with --variant NAME, or let --auto choose for this box")
    if auto:
        return choose_variant(index_entries(index), profile, repo_id)
    if root is not None:
        return root, "the bundle at the repo root (pass --variant NAME or --auto for a variant)" if variants else (
            "the repo's only bundle")
    if len(variants) == 1:
        name = next(iter(variants))
        return variants[name], f"{name} is the repo's only variant"
    raise VariantError(
        f"{repo_id} holds {len(variants)} variants ({available}) and no bundle at its root",
        hint="pass --variant NAME, or --auto to pick the best one for this box",
    )


def _glob_escape(path: str) -> str:
    """allow_patterns are fnmatch patterns: make a file name match only itself."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _download(repo_id: str, commit: str, patterns: list[str], token, say: Progress) -> Path:
    from huggingface_hub import snapshot_download

    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return Path(snapshot_download(repo_id, revision=commit, allow_patterns=patterns, token=token))
        except Exception as exc:
            if attempt == DOWNLOAD_ATTEMPTS or not is_transient(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            say(f"download failed ({first}); attempt {attempt + 1} of {DOWNLOAD_ATTEMPTS} resumes it")
            time.sleep(RETRY_DELAY_S * attempt)
    raise AssertionError("unreachable")


def _default_dir(repo_id: str, commit: str, variant: str | None) -> Path:
    cache = Path(os.environ.get("EDGEPACK_CACHE", Path.home() / ".cache" / "edgepack"))
    # "_root" cannot clash with a variant: variant names start with a letter or digit.
    return cache / "hub" / repo_id.replace("/", "--") / commit / (variant or "_root")


def _check_out(out: Path) -> None:
    staging.check_replaceable(out, hint=_REPLACE_HINT)


def _materialize(source: Path, manifest: dict[str, Any], target: Path, repo_id: str, hash_progress=None) -> None:
    """Link (or copy) the downloaded files into a plain directory, verify every hash there,
    then put it at ``target``. A damaged file is dropped from the Hub cache as well."""
    tmp = staging.make_temp(target)
    names = [e["path"] for e in manifest["files"]] + [bundle_format.MANIFEST_NAME]
    names += [n for n in bundle_format.UNLISTED_FILES if n not in names and (source / n).is_file()]
    try:
        for name in names:
            src = source / name
            if not src.is_file():
                raise BundleIntegrityError(f"{repo_id}: {name} was not downloaded",
                                           hint="run the pull again; it resumes")
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src, dest)
        try:
            bundle_format.verify_bundle(tmp, check_hashes=True, progress=hash_progress)
        except BundleIntegrityError:
            bad = _bad_files(tmp, manifest)
            if not bad:
                raise
            for name in bad:
                _purge_cached(source / name)
            raise BundleIntegrityError(
                f"{repo_id}: {', '.join(bad)} downloaded from the Hub "
                f"{'does' if len(bad) == 1 else 'do'} not match the sha256 in {bundle_format.MANIFEST_NAME}",
                hint="the damaged copy was removed from the cache: run the pull again to fetch it afresh. "
                "If it fails again, the file on the Hub is damaged: push the bundle again",
            ) from None
        staging.publish(tmp, target, hint=_REPLACE_HINT)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link to the cached blob costs no disk; across filesystems, copy."""
    blob = Path(os.path.realpath(src))
    try:
        os.link(blob, dest)
    except OSError:
        shutil.copyfile(blob, dest)


def _bad_files(bundle: Path, manifest: dict[str, Any]) -> list[str]:
    bad = []
    for entry in manifest["files"]:
        path = bundle / entry["path"]
        if path.stat().st_size != entry["size"] or bundle_format.sha256_file(path) != entry["sha256"]:
            bad.append(entry["path"])
    return bad


def _purge_cached(snapshot_file: Path) -> None:
    """Delete a cached file and the blob behind it, so the next pull downloads it again."""
    blob = Path(os.path.realpath(snapshot_file))
    for path in (blob, snapshot_file):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
