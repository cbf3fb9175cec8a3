"""The edgepack bundle format: manifest schema, version gate, reading, writing, verifying.

This is the one module that knows the on-disk format (see FORMAT.md beside it). The
exporter writes through it and the runtime reads through it, so it imports only the
standard library: a small box pays nothing extra to check a bundle.

Checks run cheapest first and trust nothing they have not checked yet: the manifest
parses and validates (every problem listed at once), its version is one we read, the
file set is exact, no path escapes the bundle, sizes match before hashes are computed,
hashes match before any file is parsed, and safetensors headers are parsed with a size
cap and their offsets checked before a byte of tensor data is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from edgepack.errors import BundleIntegrityError, BundleNotFoundError, ManifestError

FORMAT_NAME = "edgepack"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_NAME = "edgepack.json"
# Files that may sit beside the listed ones without being listed themselves.
UNLISTED_FILES = (MANIFEST_NAME, "edgepack.sig")
# safetensors allows 100 MB headers; ours hold a few hundred tensor entries (~100 kB), so
# anything past 16 MiB is damage or an attack, refused before it is read into memory.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
HASH_CHUNK_BYTES = 4 * 1024 * 1024

# safetensors dtype name -> bytes per element
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# key -> (type(s), required). Nested sections are checked by _validate_* below.
_TOP_LEVEL: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True),
    "format_version": ((int,), True),
    "created_at": ((str,), True),
    "versions": ((dict,), True),
    "source": ((dict,), True),
    "architecture": ((dict,), True),
    "quantization": ((dict,), True),
    "device_map": ((dict,), True),
    "memory": ((dict,), True),
    "tensors": ((dict,), True),
    "files": ((list,), True),
    "target_profile": ((dict, type(None)), False),
    "plan": ((dict, type(None)), False),
    "verification": ((dict, type(None)), False),
}
_QUANT_KEYS = {"bits": int, "scheme": str, "compute_dtype": str, "storage_dtype": str}


# --- hashing and files -------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(root: Path, rel_paths: Iterable[str]) -> list[dict[str, Any]]:
    """Manifest ``files`` entries (path, size, sha256) for files under ``root``."""
    entries = []
    for rel in sorted(rel_paths):
        path = root / rel
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- manifest ----------------------------------------------------------------------------


def manifest_path(bundle_dir: str | os.PathLike) -> Path:
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleNotFoundError(
            f"bundle not found: {bundle} is not a directory",
            hint="pass the directory that `edgepack pack` wrote (it holds edgepack.json)",
        )
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleNotFoundError(
            f"not an edgepack bundle: {bundle} has no {MANIFEST_NAME}",
            hint="an interrupted `edgepack pack` leaves no manifest; pack the model again",
        )
    return path


def read_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate ``edgepack.json``; raise ManifestError listing every problem."""
    path = manifest_path(bundle_dir)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{path} is {size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may be",
            hint="the manifest is damaged or not edgepack's; pack the model again",
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(
            f"{path} is not valid JSON ({exc})",
            hint="the manifest is damaged; pull or pack the bundle again",
        ) from None
    return validate_manifest(data, origin=str(path))


def validate_manifest(data: Any, origin: str = MANIFEST_NAME) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ManifestError(f"{origin}: the manifest must be a JSON object, not {type(data).__name__}")
    if data.get("format") != FORMAT_NAME:
        raise ManifestError(
            f"{origin}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}",
            hint="this is not an edgepack manifest",
        )
    version = data.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise ManifestError(
            f"{origin}: bundle format version {version!r} is not one this edgepack reads "
            f"(reads {', '.join(map(str, SUPPORTED_VERSIONS))})",
            hint="upgrade edgepack (pip install -U edgepack), or re-pack the model with this version",
        )
    problems = _schema_problems(data)
    if problems:
        raise ManifestError(
            f"{origin}: invalid manifest: " + "; ".join(problems),
            hint="the manifest is damaged or was edited by hand; pack the model again",
        )
    return data


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _schema_problems(data: dict[str, Any]) -> list[str]:
    problems = []
    for key, (types, required) in _TOP_LEVEL.items():
        if key not in data:
            if required:
                problems.append(f"missing key {key!r}")
        elif not isinstance(data[key], types) or isinstance(data[key], bool):
            problems.append(f"{key!r} must be {_type_name(types)}")
    quant = data.get("quantization")
    if isinstance(quant, dict):
        for key, typ in _QUANT_KEYS.items():
            if not isinstance(quant.get(key), typ) or isinstance(quant.get(key), bool):
                problems.append(f"quantization.{key} must be {typ.__name__}")
        if quant.get("bits") not in (16, 8, 4):
            problems.append(f"quantization.bits must be 16, 8 or 4, not {quant.get('bits')!r}")
    if isinstance(data.get("files"), list):
        problems += _files_problems(data["files"])
    if isinstance(data.get("tensors"), dict):
        problems += _tensors_problems(data["tensors"], data.get("files"))
    if isinstance(data.get("device_map"), dict):
        for name, device in data["device_map"].items():
            if not isinstance(device, (str, int)) or isinstance(device, bool):
                problems.append(f"device_map[{name!r}] must be a device name or index")
    return problems


def _files_problems(files: list[Any]) -> list[str]:
    problems, seen = [], set()
    for i, entry in enumerate(files):
        where = f"files[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object")
            continue
        rel = entry.get("path")
        if not isinstance(rel, str) or not rel:
            problems.append(f"{where}.path must be a non-empty string")
            continue
        problem = unsafe_path_problem(rel)
        if problem:
            problems.append(f"{where}.path {rel!r} {problem}")
        if rel in seen:
            problems.append(f"{where}.path {rel!r} is listed twice")
        seen.add(rel)
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            problems.append(f"{where}.size must be a non-negative integer")
        digest = entry.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)):
            problems.append(f"{where}.sha256 must be 64 hex digits")
    return problems


def _tensors_problems(tensors: dict[str, Any], files: Any) -> list[str]:
    listed = {e.get("path") for e in files if isinstance(e, dict)} if isinstance(files, list) else set()
    problems = []
    for name, info in tensors.items():
        if not isinstance(info, dict):
            problems.append(f"tensors[{name!r}] must be an object")
            continue
        if info.get("file") not in listed:
            problems.append(f"tensors[{name!r}].file {info.get('file')!r} is not a listed file")
        if info.get("dtype") not in DTYPE_BYTES:
            problems.append(f"tensors[{name!r}].dtype {info.get('dtype')!r} is not a safetensors dtype")
        shape = info.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            problems.append(f"tensors[{name!r}].shape must be a list of non-negative integers")
    return problems


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def unsafe_path_problem(rel: str) -> str | None:
    """Why a manifest path could escape or confuse the bundle directory, or None."""
    if "\\" in rel or "\x00" in rel:
        return "contains a backslash or NUL"
    pure = PurePosixPath(rel)
    if pure.is_absolute() or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        return "is absolute"
    if any(part in ("..", ".", "") for part in rel.split("/")):
        return "has '..', '.' or empty parts"
    return None


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
            if path.is_symlink() or not path.is_file():
                odd.append(rel)
            else:
                found.add(rel)
    return found, odd


def check_files(bundle_dir: str | os.PathLike, manifest: dict[str, Any], check_hashes: bool = True) -> None:
    """The file set on disk is exactly the manifest's, each of the listed size (and hash).

    Collects every problem of the file set before raising, then checks sizes, and hashes
    only once every size is right (hashing a truncated 2 GB shard tells nothing new).
    """
    bundle = Path(bundle_dir)
    listed = {e["path"]: e for e in manifest["files"]}
    on_disk, odd = _bundle_files_on_disk(bundle)
    problems = [f"{rel} is a symlink or not a regular file" for rel in sorted(odd)]
    problems += [f"{rel} is missing" for rel in sorted(set(listed) - on_disk - set(odd))]
    extra = sorted(on_disk - set(listed) - set(UNLISTED_FILES))
    problems += [f"{rel} is not listed in the manifest" for rel in extra]
    if problems:
        raise BundleIntegrityError(
            f"bundle {bundle}: " + "; ".join(problems),
            hint="the bundle is incomplete or was modified; pull or pack it again "
            "(remove files you added yourself)",
        )
    for rel, entry in listed.items():
        size = (bundle / rel).stat().st_size
        if size != entry["size"]:
            raise BundleIntegrityError(
                f"{rel} is {size} bytes, the manifest says {entry['size']} (truncated or replaced)",
                hint="the copy is damaged; pull or pack the bundle again",
            )
    if check_hashes:
        for rel, entry in listed.items():
            if sha256_file(bundle / rel) != entry["sha256"]:
                raise BundleIntegrityError(
                    f"{rel} does not match its sha256 in the manifest (the file was changed or damaged)",
                    hint="pull or pack the bundle again; never edit a bundle's files by hand",
                )


# --- safetensors headers ------------------------------------------------------------------


def read_safetensors_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Parse a safetensors header without the safetensors package and check it fully:
    header size capped, every dtype known, every byte range inside the file, consistent
    with its dtype and shape, and ranges neither overlapping nor leaving holes."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BundleIntegrityError(f"{path.name} is too short to be a safetensors file ({file_size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > max_header_bytes or header_len > file_size - 8:
            raise BundleIntegrityError(
                f"{path.name} declares a {header_len}-byte safetensors header "
                f"(limit {max_header_bytes}, file {file_size} bytes)",
                hint="the shard is damaged or not one edgepack wrote; pull or pack the bundle again",
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleIntegrityError(f"{path.name}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise BundleIntegrityError(f"{path.name}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    _check_tensor_ranges(path.name, header, file_size - 8 - header_len)
    return header


def _check_tensor_ranges(name: str, header: dict[str, Any], data_bytes: int) -> None:
    ranges = []
    for tensor, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for dim in shape:
                numel *= int(dim)
            expected = numel * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise BundleIntegrityError(f"{name}: tensor {tensor!r} has a malformed header entry") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_bytes):
            raise BundleIntegrityError(f"{name}: tensor {tensor!r} points outside the file")
        if end - start != expected:
            raise BundleIntegrityError(
                f"{name}: tensor {tensor!r} holds {end - start} bytes but {dtype}{list(shape)} needs {expected}"
            )
        ranges.append((start, end, tensor))
    position = 0
    for start, end, tensor in sorted(ranges):
        if start != position:
            what = "overlaps another tensor" if start < position else "leaves a gap before it"
            raise BundleIntegrityError(f"{name}: tensor {tensor!r} {what} (damaged or crafted shard)")
        position = end
    if position != data_bytes:
        raise BundleIntegrityError(f"{name}: {data_bytes - position} trailing bytes after the last tensor")


def check_tensors(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Every shard's header agrees with the manifest's tensor table, name by name."""
    bundle = Path(bundle_dir)
    expected = manifest["tensors"]
    seen: dict[str, str] = {}
    for rel in sorted({info["file"] for info in expected.values()}):
        for tensor, info in read_safetensors_header(bundle / rel).items():
            want = expected.get(tensor)
            if want is None or want["file"] != rel:
                raise BundleIntegrityError(f"{rel}: tensor {tensor!r} is not in the manifest's tensor table")
            if info["dtype"] != want["dtype"] or list(info["shape"]) != want["shape"]:
                raise BundleIntegrityError(
                    f"{rel}: tensor {tensor!r} is {info['dtype']}{list(info['shape'])}, "
                    f"the manifest says {want['dtype']}{want['shape']}"
                )
            seen[tensor] = rel
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise BundleIntegrityError(
            f"{len(missing)} tensors listed in the manifest are in no shard (first: {missing[0]!r})"
        )


# --- verification records: hash once, trust a file until it changes ----------------------


def _verified_stamp_path(bundle: Path, manifest_bytes: bytes) -> Path:
    cache = Path(os.environ.get("EDGEPACK_CACHE", Path.home() / ".cache" / "edgepack"))
    key = hashlib.sha256(str(bundle.resolve()).encode() + b"\0" + manifest_bytes).hexdigest()
    return cache / "verified" / f"{key}.json"


def _file_stats(bundle: Path, manifest: dict[str, Any]) -> dict[str, list[int]]:
    stats = {}
    for entry in manifest["files"]:
        st = (bundle / entry["path"]).stat()
        stats[entry["path"]] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return stats


def verify_bundle(
    bundle_dir: str | os.PathLike, check_hashes: bool | str = True
) -> dict[str, Any]:
    """Run every check on a bundle and return its manifest.

    ``check_hashes``: True hashes every file; False checks sizes only; ``"once"`` hashes on
    the first load and then trusts files whose size, mtime and inode are unchanged (a record
    kept under ~/.cache/edgepack/verified, or $EDGEPACK_CACHE).
    """
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    stamp = None
    if check_hashes == "once":
        stamp = _verified_stamp_path(bundle, manifest_path(bundle).read_bytes())
        try:
            trusted = json.loads(stamp.read_text()) == _file_stats(bundle, manifest)
        except (OSError, ValueError):
            trusted = False
        check_hashes = not trusted
    check_files(bundle, manifest, check_hashes=bool(check_hashes))
    check_tensors(bundle, manifest)
    if stamp is not None and check_hashes:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stamp, _file_stats(bundle, manifest))
        except OSError:
            pass  # a read-only home only costs a re-hash next time
    return manifest
