"""``edgepack push`` and ``edgepack pull``: bundles on the Hugging Face Hub.

A repo holds one bundle at its root, or several variants, one folder per target device
(``pi5-8gb/``, ``t4/``, ...), or both. ``edgepack-variants.json`` at the root indexes them:
each variant's bits, scheme, target profile, weight bytes and memory need. Pushing a variant
replaces that folder only, rewrites the index and the model card, all in one commit.

    >>> from edgepack.hub import push, pull
    >>> push("smollm2-4bit", "me/smollm2-edge", variant="pi5-8gb")
    >>> pulled = pull("me/smollm2-edge", auto=True)      # picks what fits this box
    >>> pulled.path, pulled.variant, pulled.reason

Downloads go through huggingface_hub's cache (HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply),
restricted to the chosen variant's files; the bundle is then linked (or copied) into a
directory of plain files and every file is hashed against ``edgepack.json`` before ``pull``
returns. A failed or damaged download is never handed to the runtime: the next pull resumes
it, and a file whose hash is wrong is deleted from the cache so it is fetched afresh.

huggingface_hub is imported inside the functions that use it: ``import edgepack.hub`` is cheap.
Library functions report through a ``progress`` callback; only ``main_*`` print.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from edgepack.format import bundle as bundle_format
from edgepack.format import staging
from edgepack.errors import (
    BundleIntegrityError, EdgepackError, HubError, OutputExistsError, SignatureError, VariantError, printable,
)

INDEX_NAME = "edgepack-variants.json"
INDEX_FORMAT = "edgepack-variants"
INDEX_VERSION = 1
CARD_NAME = "README.md"
# Same figure as edgepack.runtime.RUNTIME_OVERHEAD_BYTES (not imported: that pulls in torch):
# interpreter + torch + transformers (~350 MiB measured on x86-64) + a short run's KV cache.
RUNTIME_OVERHEAD_BYTES = 400 * 1024 * 1024
# A dropped connection is retried by huggingface_hub itself; this covers what it gives up on
# (a 5xx, a second drop). Each attempt resumes from the bytes already in the cache.
DOWNLOAD_ATTEMPTS = 3
RETRY_DELAY_S = 2.0
# An index entry is ~1.5 kB, so 1 MiB holds hundreds of variants; anything larger is
# damage or an attack, refused before it is read into memory and parsed.
MAX_INDEX_BYTES = 1024 * 1024
_VARIANT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
_REPO_REF_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?\Z")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}\Z")
_QUALITY_KEYS = ("top1_agreement_vs_source", "mean_kl_vs_source", "prompt_tokens", "tensors_bit_identical")
_REPLACE_HINT = "choose an empty or new folder with -o (pull replaces only an edgepack bundle)"
_TOKEN_HINT = "set HF_TOKEN or pass --token (a token from https://huggingface.co/settings/tokens)"

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


@dataclass(frozen=True)
class PullResult:
    path: Path  # a verified bundle directory, ready for edgepack.load
    repo_id: str
    commit: str  # the commit every file came from
    variant: str | None  # None: the bundle at the repo root
    reason: str  # why this variant, in a sentence


# --- repo references -----------------------------------------------------------------------


def parse_repo_ref(ref: str) -> tuple[str, str | None]:
    """``owner/name``, ``owner/name@revision`` or ``hf://owner/name[@revision]`` -> (repo_id, revision)."""
    text = ref.removeprefix("hf://").strip("/") if ref.startswith("hf://") else ref
    if not _REPO_REF_RE.match(text):
        raise HubError(
            f"{ref!r} is not a Hub repo reference",
            hint="write it as owner/name, owner/name@revision or hf://owner/name",
        )
    repo_id, _, revision = text.partition("@")
    return repo_id, revision or None


def check_variant_name(name: str) -> str:
    if not isinstance(name, str) or not _VARIANT_RE.match(name):
        raise VariantError(
            f"variant name {name!r} must be 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            hint="name it after the target device, e.g. --variant pi5-8gb",
        )
    return name


def resolve_bundle_ref(ref: str | os.PathLike, *, token: str | None = None, progress: Progress | None = None) -> Path:
    """A local bundle directory as is; ``hf://owner/name[@rev]`` or a repo id (not an existing
    path) is pulled, variant picked for this box, verified, and its local path returned."""
    text = str(ref)
    path = Path(text).expanduser()
    if not text.startswith("hf://") and (path.exists() or not _REPO_REF_RE.match(text)):
        return path  # edgepack.load explains a missing or broken local bundle
    try:
        pulled = pull(text, auto=True, token=token, progress=progress, check_hashes="once")
    except HubError as exc:
        if text.startswith("hf://"):
            raise
        raise HubError(f"{exc.message} (and there is no local directory {text})", hint=exc.hint) from None
    if progress is not None:
        progress(f"variant: {pulled.reason}")
    return pulled.path


# --- the variant index --------------------------------------------------------------------------


def variant_entry(manifest: dict[str, Any], name: str | None) -> dict[str, Any]:
    """What the index (and the model card) records about one bundle, from its manifest."""
    quant, source = manifest["quantization"], manifest["source"]
    memory = dict(manifest["memory"])
    files = manifest["files"]
    weight_bytes = memory.get("weight_bytes")
    if not isinstance(weight_bytes, int) or isinstance(weight_bytes, bool):
        weight_bytes = sum(e["size"] for e in files if e["path"].endswith(".safetensors"))
    verification = manifest.get("verification") or {}
    arch = manifest.get("architecture") or {}
    base = source.get("base_model") or (source.get("repo_id") if source.get("kind") == "hub" else None)
    return {
        "name": name,
        "path": name or "",
        "bits": quant["bits"],
        "scheme": quant["scheme"],
        "method": quant.get("method"),
        # what the exporter did before rounding, as the model card names it
        "calibrated": [step for key, step in (("smoothing", "smoothed"), ("rounding", "GPTQ")) if isinstance(quant.get(key), dict)],
        "compute_dtype": quant.get("compute_dtype"),
        "target_profile": (manifest.get("target_profile") or {}).get("name"),
        "weight_bytes": weight_bytes,
        "memory_need_bytes": weight_bytes + RUNTIME_OVERHEAD_BYTES,
        "memory": memory,
        "files": len(files),
        "file_bytes": sum(e["size"] for e in files),
        "quality": {k: verification[k] for k in _QUALITY_KEYS if k in verification},
        "source": {"base_model": base, "license": source.get("license")},
        "architecture": {k: arch.get(k) for k in ("model_type", "num_parameters")},
        "created_at": manifest["created_at"],
        "edgepack_version": (manifest.get("versions") or {}).get("edgepack"),
    }


def new_index() -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "root": None, "variants": []}


def index_entries(index: dict[str, Any]) -> list[dict[str, Any]]:
    """Every bundle the index lists: the variants, then the root bundle if there is one."""
    return list(index["variants"]) + ([index["root"]] if index.get("root") else [])


def check_index(data: Any, origin: str) -> dict[str, Any]:
    """Validate an index read from the Hub (untrusted input); raise HubError listing the problems."""
    problems = []
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        problems.append(f"not an {INDEX_FORMAT} file")
    elif data.get("format_version") != INDEX_VERSION:
        problems.append(f"format_version {data.get('format_version')!r} is not {INDEX_VERSION}")
    else:
        variants = data.get("variants")
        if not isinstance(variants, list):
            problems.append("variants must be a list")
            variants = []
        for i, entry in enumerate(variants):
            problems += _entry_problems(entry, f"variants[{i}]", root=False)
        if data.get("root") is not None:
            problems += _entry_problems(data["root"], "root", root=True)
        names = [e.get("name") for e in variants if isinstance(e, dict)]
        problems += [f"variant {n!r} is listed twice" for n in sorted(set(names)) if names.count(n) > 1]
    if problems:
        raise HubError(
            f"{origin} is malformed: " + "; ".join(problems),
            hint="push a variant again to rewrite the index, or pull with the repo's root bundle",
        )
    return data


def _entry_problems(entry: Any, where: str, root: bool) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where} must be an object"]
    problems = []
    name = entry.get("name")
    if root:
        if name is not None or entry.get("path") != "":
            problems.append(f"{where} must have name null and path ''")
    elif not (isinstance(name, str) and _VARIANT_RE.match(name)) or entry.get("path") != name:
        problems.append(f"{where} has a bad name/path ({name!r}, {entry.get('path')!r})")
    if entry.get("bits") not in (16, 8, 4):
        problems.append(f"{where}.bits must be 16, 8 or 4")
    for key in ("weight_bytes", "memory_need_bytes"):
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"{where}.{key} must be a non-negative integer")
    if not isinstance(entry.get("scheme"), str):
        problems.append(f"{where}.scheme must be a string")
    memory = entry.get("memory", {})
    per_device = memory.get("weight_bytes_per_device", {}) if isinstance(memory, dict) else None
    if not isinstance(per_device, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in per_device.values()
    ):
        problems.append(f"{where}.memory.weight_bytes_per_device must map devices to byte counts")
    return problems


# --- choosing a variant for a box ----------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """Whether one variant fits one box: each memory pool it needs, and what the box has there."""

    entry: dict[str, Any]
    checks: tuple[tuple[str, int, int], ...]  # (pool, bytes needed, bytes usable)
    on_gpu: bool  # its weights would live in GPU memory on this box

    @property
    def fits(self) -> bool:
        return all(need <= have for _, need, have in self.checks)

    def describe(self) -> str:
        return ", ".join(f"{_size(need)} of {pool} ({_size(have)} usable)" for pool, need, have in self.checks)


def _cuda_index(device: Any) -> int | None:
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    text = str(device)
    if text.isdigit():
        return int(text)
    if text == "cuda":
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    return None


def fit(entry: dict[str, Any], profile) -> Fit:
    """Where a variant's weights would live on this box and whether they fit there.

    The runtime follows the bundle's device_map: weights planned for a GPU go to the GPU when
    the box has one, everything else (and everything, on a box without a GPU) stays in RAM.
    The runtime overhead is counted in RAM, where the interpreter and torch live. On a
    unified-memory box (Jetson) RAM and GPU are one pool, counted once.
    """
    weight = entry["weight_bytes"]
    overhead = entry["memory_need_bytes"] - weight
    per_device = (entry.get("memory") or {}).get("weight_bytes_per_device") or {"cpu": weight}
    gpu_bytes: dict[int, int] = {}
    for device, nbytes in per_device.items():
        index = _cuda_index(device)
        if index is not None:
            gpu_bytes[index] = gpu_bytes.get(index, 0) + int(nbytes)
    if profile.unified_memory and profile.has_gpu:
        return Fit(entry, (("unified memory", weight + overhead, profile.gpu_usable_bytes(0)),), bool(gpu_bytes))
    if not gpu_bytes or not profile.has_gpu:
        return Fit(entry, (("RAM", weight + overhead, profile.ram_usable_bytes),), False)
    checks = [("RAM", weight - sum(gpu_bytes.values()) + overhead, profile.ram_usable_bytes)]
    for index, nbytes in sorted(gpu_bytes.items()):
        have = profile.gpu_usable_bytes(index) if index < len(profile.gpus) else 0
        checks.append((f"GPU {index}" if index < len(profile.gpus) else f"GPU {index} (absent)", nbytes, have))
    return Fit(entry, tuple(checks), True)


def choose_variant(entries: list[dict[str, Any]], profile, repo_id: str = "the repo") -> tuple[dict[str, Any], str]:
    """The best variant that fits ``profile``, and why. Pure: sizes in, choice out.

    Best: on a box with a GPU, a variant that runs on it beats one that would run on the CPU;
    then more bits (better quality); then the one packed for this very profile; then the
    smaller need. Raises VariantError with every variant's numbers when none fits.
    """
    from edgepack.hub.modelcard import entry_label

    if not entries:
        raise VariantError(f"{repo_id} lists no variants",
                           hint="push one with `edgepack push BUNDLE REPO_ID --variant NAME`")  # fmt: skip
    fits = [fit(e, profile) for e in entries]
    good = [f for f in fits if f.fits]
    if not good:
        details = "; ".join(f"{entry_label(f.entry)} ({f.entry['bits']}-bit) needs {f.describe()}" for f in fits)
        raise VariantError(
            f"no variant of {repo_id} fits this box ({profile.name}): {details}",
            hint="free some memory, take one anyway with --variant NAME, "
            "or pack and push a smaller one (edgepack pack --bits 4)",
        )
    best = max(good, key=lambda f: (f.on_gpu, f.entry["bits"], f.entry.get("target_profile") == profile.name,
                                    -f.entry["memory_need_bytes"], entry_label(f.entry)))  # fmt: skip
    e = best.entry
    reason = (f"{entry_label(e)} ({e['bits']}-bit {e['scheme']}) is the best fit for this box ({profile.name}): "
              f"it needs {best.describe()}")  # fmt: skip
    too_big = [f for f in fits if not f.fits and f.entry["bits"] > e["bits"]]
    if too_big:
        reason += "; not " + ", ".join(
            f"{entry_label(f.entry)} ({f.entry['bits']}-bit), which needs {f.describe()}" for f in too_big
        )
    on_cpu = [f for f in good if f.entry["bits"] > e["bits"] and not f.on_gpu and best.on_gpu]
    if on_cpu:
        reason += "; preferred to " + ", ".join(
            f"{entry_label(f.entry)} ({f.entry['bits']}-bit), which fits but would run on the CPU" for f in on_cpu
        )
    return e, reason


def _size(n: int) -> str:
    gib = 1 << 30
    return f"{n / gib:.2f} GiB" if abs(n) >= gib else f"{n / (1 << 20):.1f} MiB"


# --- Hub errors -----------------------------------------------------------------------------------


def _have_token(token: str | bool | None) -> bool:
    if token is False:
        return False
    if token:
        return True
    from huggingface_hub import get_token

    return get_token() is not None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


# Network failures of the HTTP library under huggingface_hub: httpx2 (2.x), httpx (1.x), requests (0.x).
_TRANSPORT_ERRORS = (("httpx2", "TransportError"), ("httpx", "TransportError"),
                     ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout"),
                     ("requests.exceptions", "ChunkedEncodingError"))  # fmt: skip


def _transport_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, name in _TRANSPORT_ERRORS:
        module = sys.modules.get(module_name)  # only what is already loaded can have failed
        if module is not None and isinstance(getattr(module, name, None), type):
            found.append(getattr(module, name))
    return tuple(found)


def _transient(exc: BaseException) -> bool:
    """A failure that another attempt may not hit again: a 5xx, a 429, a dropped connection."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, LocalEntryNotFoundError):  # the listing failed and the cache lacks the files
        return exc.__cause__ is not None and _transient(exc.__cause__)
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        return status is None or status >= 500 or status == 429
    return isinstance(exc, _transport_errors())


def _hub_error(exc: BaseException, repo_id: str, revision: str | None, token, *,
               writing: bool = False) -> EdgepackError:  # fmt: skip
    """Turn a huggingface_hub exception into one of ours, with a hint that names the next step."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = _status(exc)
    if isinstance(exc, HFValidationError):
        return HubError(f"{repo_id!r} is not a valid Hub repo id: {exc}".splitlines()[0],
                        hint="repo ids look like owner/name: letters, digits, '-', '_', '.'")  # fmt: skip
    if isinstance(exc, GatedRepoError):
        return HubError(
            f"{repo_id} is gated: its terms must be accepted on the Hub before it can be downloaded",
            hint=f"accept them on the repo's page, then {_TOKEN_HINT} of the account that accepted",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(
            f"revision {revision!r} not found in {repo_id}",
            hint="check the branch, tag or commit; omit @REVISION for main",
        )
    if isinstance(exc, RepositoryNotFoundError):
        if not _have_token(token):
            return HubError(f"repository {repo_id} not found or private",
                            hint=f"check the spelling; for a private repo, {_TOKEN_HINT}")  # fmt: skip
        return HubError(
            f"repository {repo_id} not found (or your token cannot see it)",
            hint="check the spelling, and that the token belongs to an account with access",
        )
    if isinstance(exc, LocalTokenNotFoundError) or (writing and status == 401 and not _have_token(token)):
        return HubError(f"pushing to {repo_id} needs a Hugging Face token with write access", hint=_TOKEN_HINT)
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return HubError(
            "the Hub refused the token (401: invalid or expired)",
            hint="check HF_TOKEN or --token, or create a new token at https://huggingface.co/settings/tokens",
        )
    if isinstance(exc, HfHubHTTPError) and status == 403:
        return HubError(f"your token may not {'write to' if writing else 'read'} {repo_id} (403)",
                        hint="use a token with write access to that namespace")  # fmt: skip
    if isinstance(exc, HfHubHTTPError) and status == 412:
        return HubError(f"{repo_id} changed while pushing (someone else committed first)",
                        hint="push again: the index and card are rebuilt from the new state")  # fmt: skip
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)) and constants.HF_HUB_OFFLINE:
        return HubError(f"{repo_id} is not in the local cache and HF_HUB_OFFLINE is set",
                        hint="unset HF_HUB_OFFLINE (or set it to 0) to download it")  # fmt: skip
    if _transient(exc) or isinstance(exc, LocalEntryNotFoundError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return HubError(
            f"network failure talking to the Hub about {repo_id} ({type(exc).__name__}: {first})",
            hint="check the connection and run the same command again: downloads resume where they "
            "stopped, and nothing is loaded before every file is verified",
        )
    if isinstance(exc, HfHubHTTPError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return HubError(f"the Hub answered {status} for {repo_id}: {first}", hint="try again later")
    return HubError(f"Hub request for {repo_id} failed: {type(exc).__name__}: {exc}".splitlines()[0],
                    hint="run with --debug for the traceback")  # fmt: skip


def _hub_exceptions() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises for a failed request (our own file errors stay as they are)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
    )

    return (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, LocalTokenNotFoundError,
            OfflineModeIsEnabled, *_transport_errors())  # fmt: skip


# --- push ----------------------------------------------------------------------------------------------


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
    except _hub_exceptions() as exc:
        if isinstance(exc, EdgepackError):
            raise
        raise _hub_error(exc, repo_id, branch, token, writing=True) from exc


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
                                   key=lambda v: v["name"])  # fmt: skip
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
        + (f", removing {len(doomed)} old files" if doomed else ""))  # fmt: skip
    info = api.create_commit(repo_id, operations, commit_message=message, revision=branch, parent_commit=head)
    return PushResult(repo_id, branch, variant, info.oid, info.commit_url, len(names), len(doomed))


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def _index_for_push(api, repo_id: str, head: str, remote: set[str]) -> dict[str, Any]:
    """The repo's index at ``head``; rebuilt from the root manifest for a repo pushed without one."""
    if INDEX_NAME in remote:
        path = api.hf_hub_download(repo_id, INDEX_NAME, revision=head)
        return check_index(_load_json(path, f"{repo_id}/{INDEX_NAME}"), f"{repo_id}/{INDEX_NAME}")
    index = new_index()
    if bundle_format.MANIFEST_NAME in remote:
        path = api.hf_hub_download(repo_id, bundle_format.MANIFEST_NAME, revision=head)
        index["root"] = variant_entry(_manifest_from(path, repo_id), None)
    return index


def _root_bundle_files(api, repo_id: str, head: str, remote: set[str]) -> list[str]:
    """The files of the bundle now at the repo root (from its manifest), to replace them."""
    if bundle_format.MANIFEST_NAME not in remote:
        return []
    path = api.hf_hub_download(repo_id, bundle_format.MANIFEST_NAME, revision=head)
    manifest = _manifest_from(path, repo_id)
    listed = [e["path"] for e in manifest["files"]] + list(bundle_format.UNLISTED_FILES)
    return [p for p in listed if p in remote]


def _load_json(path: str | os.PathLike, origin: str) -> Any:
    """An index from the Hub: size-capped before it is read, any bytes an HubError."""
    with open(path, "rb") as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise HubError(f"{origin} is more than the {MAX_INDEX_BYTES} bytes an index may be",
                       hint="push a variant again to rewrite the index")  # fmt: skip
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise HubError(f"{origin} is not valid JSON (nested too deeply)",
                       hint="push a variant again to rewrite the index") from None  # fmt: skip
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubError(f"{origin} is not valid JSON ({exc})", hint="push the bundle again to rewrite it") from None
    except RecursionError:
        raise HubError(f"{origin} is not valid JSON (nested too deeply)", hint="push the bundle again to rewrite it") from None


def _manifest_from(path: str | os.PathLike, repo_id: str, prefix: str = "") -> dict[str, Any]:
    """A manifest from the Hub, with the size cap and strict parse a local bundle's gets."""
    origin = f"{repo_id}/{prefix}{bundle_format.MANIFEST_NAME}"
    with open(path, "rb") as f:
        raw = f.read(bundle_format.MAX_MANIFEST_BYTES + 1)
    if len(raw) > bundle_format.MAX_MANIFEST_BYTES:
        raise bundle_format.ManifestError(f"{origin} is more than the {bundle_format.MAX_MANIFEST_BYTES} bytes "
                                          "a manifest may be", hint="push the bundle again")  # fmt: skip
    return bundle_format.parse_manifest(raw, origin=origin)


# --- pull ------------------------------------------------------------------------------------------------


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
) -> PullResult:
    """Download one bundle of a Hub repo, verify every file, return where it is and why.

    ``repo_ref``: ``owner/name``, ``owner/name@revision`` or ``hf://...``. ``variant`` names a
    folder of the repo; ``auto`` (or a ``profile``) picks the best variant that fits this box
    (``edgepack.plan.probe.probe()``) or the given DeviceProfile. Neither: the root bundle, or
    the only variant. ``out``: the directory to write (default: under ~/.cache/edgepack/hub,
    or $EDGEPACK_CACHE/hub). ``check_hashes="once"`` trusts a copy already pulled and hashed
    whose files are unchanged since; fresh downloads are always hashed.
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
        return _pull(repo_id, revision, out, variant, auto or profile is not None, token, profile, check_hashes, say)
    except _hub_exceptions() as exc:
        if isinstance(exc, EdgepackError):
            raise
        raise _hub_error(exc, repo_id, revision, token) from exc


def _pull(repo_id, revision, out, variant, auto, token, profile, check_hashes, say) -> PullResult:
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
                       hint="push that variant again")  # fmt: skip
    manifest = _manifest_from(manifest_path, repo_id, prefix)
    if auto:
        _check_choice(repo_id, entry, manifest, profile)
    manifest_bytes = Path(manifest_path).read_bytes()
    target = Path(out) if out is not None else _default_dir(repo_id, commit, entry["name"])

    existing = target / bundle_format.MANIFEST_NAME
    if existing.is_file() and existing.read_bytes() == manifest_bytes:
        try:
            bundle_format.verify_bundle(target, check_hashes=check_hashes)
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
    _materialize(snapshot / prefix if prefix else snapshot, manifest, target, repo_id)
    return PullResult(target, repo_id, commit, entry["name"], reason)


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
                           hint="free some memory, or take one anyway with --variant NAME")  # fmt: skip


def _read_repo(repo_id: str, revision: str, token) -> tuple[dict[str, Any], str]:
    """(index, commit sha), read at one commit. A repo without an index has a root bundle only."""
    commit = revision if _COMMIT_RE.match(revision) else None
    index_path = _fetch(repo_id, INDEX_NAME, commit or revision, token)
    if index_path is not None:
        commit = commit or _commit_of(index_path, INDEX_NAME)
        index = check_index(_load_json(index_path, f"{repo_id}/{INDEX_NAME}"), f"{repo_id}/{INDEX_NAME}")
        return index, commit or revision
    manifest_path = _fetch(repo_id, bundle_format.MANIFEST_NAME, commit or revision, token)
    if manifest_path is None:
        raise HubError(
            f"{repo_id}@{revision} is not an edgepack repo: "
            f"it has neither {INDEX_NAME} nor {bundle_format.MANIFEST_NAME}",
            hint="check the repo id; publish a bundle with `edgepack push BUNDLE REPO_ID`",
        )
    commit = commit or _commit_of(manifest_path, bundle_format.MANIFEST_NAME)
    manifest = _manifest_from(manifest_path, repo_id)
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
                           hint="pick one of them with --variant NAME, or let --auto choose for this box")  # fmt: skip
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
            if attempt == DOWNLOAD_ATTEMPTS or not _transient(exc):
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


def _materialize(source: Path, manifest: dict[str, Any], target: Path, repo_id: str) -> None:
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
                                           hint="run the pull again; it resumes")  # fmt: skip
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src, dest)
        try:
            bundle_format.verify_bundle(tmp, check_hashes=True)
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


# --- CLI glue (the only code here that prints) ------------------------------------------------------


def _say(msg: str) -> None:
    print(f"[edgepack] {printable(msg)}", file=sys.stderr, flush=True)  # msg quotes repo and variant names


def configure_push_parser(p) -> None:
    p.add_argument("bundle", help="bundle directory (written by `edgepack pack`)")
    p.add_argument("repo_id", help="Hub repo, owner/name (created if needed)")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")  # fmt: skip
    p.add_argument("--revision", default=None, metavar="BRANCH", help="branch to push to (created from main if new)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="push into folder NAME/ (e.g. pi5-8gb), replacing only that variant")  # fmt: skip
    p.add_argument("--commit-message", default=None, metavar="MSG",
                   help="the Hub commit's message (default: one naming the bundle and its variant)")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")


def main_push(args) -> int:
    result = push(args.bundle, args.repo_id, private=args.private, revision=args.revision, variant=args.variant,
                  commit_message=args.commit_message, token=args.token, progress=_say)  # fmt: skip
    where = f"variant {result.variant} ({result.variant}/)" if result.variant else "the repo root"
    deleted = f", {result.files_deleted} old files removed" if result.files_deleted else ""
    if getattr(args, "json", False):
        print(json.dumps({"bundle": str(args.bundle), "repo_id": result.repo_id, "revision": result.revision,
                          "variant": result.variant, "files_uploaded": result.files_uploaded,
                          "files_deleted": result.files_deleted, "commit_url": result.commit_url}))  # fmt: skip
        return 0
    print(printable(f"pushed {args.bundle} to {result.repo_id}@{result.revision}, {where}: "
                    f"{result.files_uploaded} files{deleted}, index and model card updated"))  # fmt: skip
    print(printable(result.commit_url))
    return 0


def configure_pull_parser(p) -> None:
    p.add_argument("repo", metavar="REPO_ID[@REVISION]", help="owner/name, owner/name@revision or hf://owner/name")
    p.add_argument("-o", "--out", default=None, metavar="DIR", help="write the bundle here (default: edgepack's cache)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--variant", default=None, metavar="NAME", help="the variant folder to pull")
    which.add_argument("--auto", action="store_true", help="profile this box and pull the best variant that fits")
    p.add_argument("--profile", default=None, metavar="NAME|FILE",
                   help="with --auto: choose for this device profile instead of probing this box")  # fmt: skip
    p.add_argument("--revision", default=None, help="branch, tag or commit (or write REPO_ID@REVISION)")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--key", default=None, metavar="PUBKEY",
                   help="refuse the bundle unless this Ed25519 public key signed it (default: $EDGEPACK_TRUSTED_KEY)")


def main_pull(args) -> int:
    profile = None
    if args.profile is not None:
        if args.variant is not None:
            raise VariantError("--profile chooses a variant; it cannot be combined with --variant",
                               hint="use --auto --profile NAME, or --variant NAME")  # fmt: skip
        from edgepack.plan.profile import load_profile

        profile = load_profile(args.profile)
    result = pull(args.repo, out=args.out, variant=args.variant, auto=args.auto, revision=args.revision,
                  token=args.token, profile=profile, progress=_say)  # fmt: skip
    key = getattr(args, "key", None) or os.environ.get("EDGEPACK_TRUSTED_KEY") or None
    from edgepack.format import signing

    if key is not None:
        try:
            signing.verify_signature(result.path, key)
        except SignatureError as exc:
            raise SignatureError(f"{exc.message}; the files pulled to {result.path} are not to be trusted",
                                 hint=exc.hint) from None  # fmt: skip
    elif (result.path / bundle_format.SIGNATURE_NAME).exists():
        signing.read_signature(result.path)  # a malformed signature is refused, not ignored
    manifest = bundle_format.read_manifest(result.path)
    total = sum(e["size"] for e in manifest["files"])
    if getattr(args, "json", False):
        print(json.dumps({"path": str(result.path), "repo_id": result.repo_id, "commit": result.commit,
                          "variant": result.variant, "reason": result.reason,
                          "files": len(manifest["files"]), "bytes": total, "signature_checked": key is not None}))
        return 0
    print(f"variant: {printable(result.reason)}", file=sys.stderr)  # names and figures from the remote index
    print(printable(f"ok: {result.repo_id}@{result.commit[:8]}: {len(manifest['files'])} files, {total / 1e6:.1f} MB, "
                    "sizes and sha256 match the manifest"), file=sys.stderr)  # fmt: skip
    print(printable(result.path))
    return 0
