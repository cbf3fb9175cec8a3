"""The edgepack bundle format: manifest schema, version gate, reading, writing, verifying.

This is the one module that knows the on-disk format (see FORMAT.md beside it). The
exporter writes through it and the runtime reads through it, so it imports only the
standard library: a small box pays nothing extra to check a bundle.

Checks run cheapest first and trust nothing they have not checked yet: the manifest
parses and validates (every problem listed at once), its version is one we read, the
file set is exact, no path escapes the bundle and every file is a regular file, sizes
match before hashes are computed, hashes match before any file is parsed, safetensors
headers are parsed with a size cap and their offsets checked before a byte of tensor data
is touched, and the tensor table agrees with the shards and with config.json before the
runtime builds a single module. Whatever goes wrong comes out as an EdgepackError.

    files.py        plain files only, hashing, atomic JSON writes, strict JSON reads
    manifest.py     the manifest's schema, the version gate, reading and validating it
    safetensors.py  shard headers, parsed and range-checked without the safetensors package
    bundle.py       the whole check (verify_bundle) and the names callers import from here
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable

from edgepack.errors import BundleIntegrityError, EdgepackError, ManifestError
from edgepack.format.files import (
    HASH_CHUNK_BYTES,
    file_entries,
    is_int,
    open_regular,
    parse_json,
    read_exact_into,
    sha256_file,
    short_repr,
    write_json_atomic,
)
from edgepack.format.manifest import (
    COMPUTE_DTYPES,
    CONFIG_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    QUANT_TYPES_4BIT,
    SIGNATURE_NAME,
    SUPPORTED_VERSIONS,
    UNFINISHED_NAME,
    UNLISTED_FILES,
    manifest_path,
    parse_manifest,
    read_manifest,
    read_manifest_bytes,
    unsafe_path_problem,
    validate_manifest,
)
from edgepack.format.safetensors import (
    DTYPE_BYTES,
    MAX_HEADER_BYTES,
    check_shard_header,
    read_safetensors_header,
    read_shard_header,
    shard_files,
)

# the names callers import from edgepack.format.bundle
__all__ = [
    "BundleIntegrityError",
    "ManifestError",
    "COMPUTE_DTYPES",
    "CONFIG_NAME",
    "DTYPE_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HASH_CHUNK_BYTES",
    "MANIFEST_NAME",
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_MANIFEST_BYTES",
    "QUANT_TYPES_4BIT",
    "SIGNATURE_NAME",
    "SUPPORTED_VERSIONS",
    "UNFINISHED_NAME",
    "UNLISTED_FILES",
    "check_config",
    "check_files",
    "check_shard_header",
    "check_tensors",
    "file_entries",
    "manifest_path",
    "open_regular",
    "parse_manifest",
    "read_exact_into",
    "read_manifest",
    "read_manifest_bytes",
    "read_safetensors_header",
    "read_shard_header",
    "sha256_file",
    "shard_files",
    "unsafe_path_problem",
    "validate_manifest",
    "verify_bundle",
    "write_json_atomic",
]

MAX_CONFIG_BYTES = 16 * 1024 * 1024
# config.json spellings of the sizes checked against the embedding (Llama, GPT-2, T5-style)
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                       "tok_embeddings.weight")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


# --- the files of a bundle ----------------------------------------------------------------


def _bundle_files_on_disk(bundle: Path) -> tuple[set[str], list[str]]:
    """Regular files under ``bundle`` (relative POSIX paths), and paths that are not
    regular files (symlinks, devices, fifos)."""
    found, odd = set(), []
    for dirpath, dirnames, filenames in os.walk(bundle, followlinks=False):
        base = Path(dirpath)
        for name in list(dirnames):
            if (base / name).is_symlink():
                odd.append((base / name).relative_to(bundle).as_posix())
                dirnames.remove(name)
        for name in filenames:
            path = base / name
            rel = path.relative_to(bundle).as_posix()
            if not stat.S_ISREG(path.lstat().st_mode):
                odd.append(rel)
            else:
                found.add(rel)
    return found, odd


def check_files(bundle_dir: str | os.PathLike, manifest: dict[str, Any], check_hashes: bool = True,
                progress: Callable[[int, int], None] | None = None) -> None:
    """The file set on disk is exactly the manifest's, each of the listed size (and hash).
    ``progress(done_bytes, total_bytes)`` as the hashing goes.

    Collects every problem of the file set before raising, then checks sizes, and hashes
    only once every size is right (hashing a truncated 2 GB shard tells nothing new).
    """
    bundle = Path(bundle_dir)
    listed = {e["path"]: e for e in manifest["files"]}
    on_disk, odd = _bundle_files_on_disk(bundle)
    problems = [f"{rel} is a symlink or not a regular file" for rel in sorted(odd)]
    problems += [f"{rel} is missing" for rel in sorted(set(listed) - on_disk - set(odd))]
    extra = sorted(on_disk - set(listed) - set(UNLISTED_FILES) - {UNFINISHED_NAME})  # verify_bundle gates it
    problems += [f"{rel} is not listed in the manifest" for rel in extra]
    if problems:
        raise BundleIntegrityError(
            f"bundle {bundle}: " + "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else ""),
            hint="the bundle is incomplete or was modified; pull or pack it again "
            "(remove files you added yourself)",
        )
    for rel, entry in listed.items():
        size = (bundle / rel).lstat().st_size
        if size != entry["size"]:
            raise BundleIntegrityError(
                f"{rel} is {size} bytes, the manifest says {entry['size']} (truncated or replaced)",
                hint="the copy is damaged; pull or pack the bundle again",
            )
    if check_hashes:
        total, done = sum(e["size"] for e in listed.values()), 0

        def hashed(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)

        for rel, entry in listed.items():
            digest = sha256_file(bundle / rel, hashed) if progress else sha256_file(bundle / rel)
            if digest != entry["sha256"]:
                raise BundleIntegrityError(
                    f"{rel} does not match its sha256 in the manifest (the file was changed or damaged)",
                    hint="pull or pack the bundle again; never edit a bundle's files by hand",
                )



def check_tensors(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Every shard's header agrees with the manifest's tensor table, name by name."""
    bundle = Path(bundle_dir)
    seen: set[str] = set()
    for rel in shard_files(manifest):
        header = read_safetensors_header(bundle / rel)
        check_shard_header(rel, header, manifest)
        seen.update(header)
    missing = sorted(set(manifest["tensors"]) - seen)
    if missing:
        raise BundleIntegrityError(
            f"{len(missing)} tensors listed in the manifest are in no shard (first: {short_repr(missing[0])})"
        )


# --- config.json against the tensor table -------------------------------------------------------


def check_config(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """config.json describes the model the weights are for: its vocab_size and hidden size
    match the embedding's shape and its layer count the layers the tensor table holds.
    Checked on sizes alone, before the runtime builds a single module."""
    bundle = Path(bundle_dir)
    if CONFIG_NAME not in {e["path"] for e in manifest["files"]}:
        raise BundleIntegrityError(
            f"the manifest lists no {CONFIG_NAME}; the runtime cannot know the model's architecture",
            hint="pack the model again",
        )
    with open_regular(bundle / CONFIG_NAME) as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    config, problem = parse_json(raw) if len(raw) <= MAX_CONFIG_BYTES else (None, "too large")
    if problem is not None or not isinstance(config, dict):
        raise BundleIntegrityError(f"{CONFIG_NAME} is not a JSON object ({problem or 'wrong type'})")
    if not is_int(config.get("vocab_size")) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # multimodal wrappers keep the LM's sizes here
    problems = _config_problems(config, manifest)
    if problems:
        raise BundleIntegrityError(
            f"{CONFIG_NAME} disagrees with the weights: " + "; ".join(problems),
            hint="the bundle's config.json was edited or belongs to another model; pack the model again",
        )


def _config_problems(config: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    tensors = manifest["tensors"]
    quantized = set(manifest["quantization"].get("quantized_modules", []))
    problems = []
    vocab = config.get("vocab_size")
    hidden = next((config[k] for k in _HIDDEN_KEYS if is_int(config.get(k))), None)
    for name, info in tensors.items():
        if name.endswith(_EMBEDDING_SUFFIXES) and name.rsplit(".", 1)[0] not in quantized:
            if is_int(vocab) and is_int(hidden) and info["shape"] != [vocab, hidden]:
                problems.append(
                    f"vocab_size {vocab} and hidden size {hidden} need {name} of shape {[vocab, hidden]}, "
                    f"the weights hold {info['shape']}"
                )
    layers = next((config[k] for k in _LAYER_KEYS if is_int(config.get(k))), None)
    indices = {int(m.group(1)) for name in tensors if (m := _LAYER_INDEX.search(name))}
    # indices == {0, ..., layers - 1}, without building that set (a crafted config may say 10**9)
    if layers is not None and indices and (len(indices) != layers or min(indices) != 0 or max(indices) != layers - 1):
        problems.append(f"it describes {layers} layers, the weights hold layers {short_repr(sorted(indices))}")
    return problems


# --- verification records: hash once, trust a file until it changes ----------------------


def _verified_stamp_path(bundle: Path, manifest_bytes: bytes) -> Path:
    cache = Path(os.environ.get("EDGEPACK_CACHE", Path.home() / ".cache" / "edgepack"))
    key = hashlib.sha256(str(bundle.resolve()).encode() + b"\0" + manifest_bytes).hexdigest()
    return cache / "verified" / f"{key}.json"


def _file_stats(bundle: Path, manifest: dict[str, Any]) -> dict[str, list[int]]:
    stats = {}
    for entry in manifest["files"]:
        st = (bundle / entry["path"]).lstat()
        # ctime too: an in-place edit can keep size, inode and (utime) mtime, but no user
        # can set the inode change time back
        stats[entry["path"]] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    return stats


def _check_finished(bundle: Path) -> None:
    """Refuse a folder a pack or pull is still writing, or died writing: it may hold a
    manifest and every listed file before it was verified. Only the process named in the
    marker, the one writing it, may verify it (that is how it checks its own work)."""
    marker = bundle / UNFINISHED_NAME
    if not marker.exists() and not marker.is_symlink():
        return
    try:
        with open_regular(marker) as f:
            writer = json.loads(f.read(4096)).get("pid")
    except (OSError, ValueError, AttributeError):
        writer = None
    if writer != os.getpid():
        raise BundleIntegrityError(
            f"{bundle} is an unfinished bundle: an edgepack pack or pull was writing it "
            f"(it holds {UNFINISHED_NAME}) and stopped before it was complete and verified",
            hint="use the folder given with -o; pack or pull again, and the next run removes this one",
        )


def verify_bundle(
    bundle_dir: str | os.PathLike, check_hashes: bool | str = True, *, manifest_bytes: bytes | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run every check on a bundle and return its manifest.

    ``check_hashes``: True hashes every file; False checks sizes only; ``"once"`` hashes on
    the first load and then trusts files whose size, mtime, inode and ctime are unchanged (a record
    kept under ~/.cache/edgepack/verified, or $EDGEPACK_CACHE). ``manifest_bytes``: verify
    against these bytes of edgepack.json (already read, e.g. to check a signature over
    them) instead of reading it again. ``progress(done_bytes, total_bytes)``: called as
    files are hashed. Every failure, an unreadable file included, is an EdgepackError.
    """
    bundle = Path(bundle_dir)
    try:
        raw = manifest_bytes if manifest_bytes is not None else read_manifest_bytes(bundle)
        manifest = parse_manifest(raw, origin=str(bundle / MANIFEST_NAME))
        _check_finished(bundle)
        stamp = None
        if check_hashes == "once":
            stamp = _verified_stamp_path(bundle, raw)
            try:
                trusted = json.loads(stamp.read_text()) == _file_stats(bundle, manifest)
            except (OSError, ValueError):
                trusted = False
            check_hashes = not trusted
        check_files(bundle, manifest, check_hashes=bool(check_hashes), progress=progress)
        check_tensors(bundle, manifest)
        check_config(bundle, manifest)
    except EdgepackError:
        raise
    except OSError as exc:  # a file vanished, is unreadable, or a path component is a symlink
        where = Path(exc.filename).name if exc.filename else str(bundle)
        raise BundleIntegrityError(
            f"cannot read {where} in bundle {bundle}: {exc.strerror or exc}",
            hint="check the bundle's permissions, or pull or pack it again",
        ) from None
    if stamp is not None and check_hashes:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stamp, _file_stats(bundle, manifest))
        except OSError:
            pass  # a read-only home only costs a re-hash next time
    return manifest
