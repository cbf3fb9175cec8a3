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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import secrets
import struct
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterable

from edgepack.errors import BundleIntegrityError, BundleNotFoundError, EdgepackError, ManifestError

FORMAT_NAME = "edgepack"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_NAME = "edgepack.json"
SIGNATURE_NAME = "edgepack.sig"
CONFIG_NAME = "config.json"
# Files that may sit beside the listed ones without being listed themselves.
UNLISTED_FILES = (MANIFEST_NAME, SIGNATURE_NAME)
# Written first into the temporary folder a pack or pull fills, removed just before it is
# renamed into place: a folder holding it is unfinished, never a bundle (see staging.py).
UNFINISHED_NAME = ".edgepack-unfinished"
# safetensors allows 100 MB headers; ours hold a few hundred tensor entries (~100 kB), so
# anything past 16 MiB is damage or an attack, refused before it is read into memory.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
HASH_CHUNK_BYTES = 4 * 1024 * 1024
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")

# safetensors dtype name -> bytes per element
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# key -> (type(s), required). Nested sections are checked by _*_problems below.
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
QUANT_TYPES_4BIT = ("nf4", "fp4", "int4")  # int4: edgepack's CPU format (FORMAT.md)
_QUANT_KEYS = {"bits": int, "scheme": str, "compute_dtype": str, "storage_dtype": str}
# config.json spellings of the sizes checked against the embedding (Llama, GPT-2, T5-style)
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                       "tok_embeddings.weight")  # fmt: skip
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- opening, hashing and listing files ----------------------------------------------------


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """Open a bundle file for reading, unbuffered: never through a symlink (O_NOFOLLOW),
    never blocking on a FIFO (O_NONBLOCK), and only if it is a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleIntegrityError(f"{Path(path).name} is not a regular file")
    return os.fdopen(fd, "rb", buffering=0)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:
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
    """Write JSON so that a reader sees the old file or the new one, never half of one. The
    file gets the umask's mode (0644 under umask 022), as open() would give it: mkstemp's
    0600 would lock the runtime's user out of a bundle packed by someone else."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_exact_into(f: IO[bytes], offset: int, buffer: memoryview, name: str) -> None:
    """Fill ``buffer`` from ``offset`` with plain reads. A file that ends early (truncated
    after it was verified) raises BundleIntegrityError; a memory map would die of SIGBUS."""
    f.seek(offset)
    view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
    while view.nbytes:
        n = f.readinto(view)
        if not n:
            raise BundleIntegrityError(
                f"{name} ended {view.nbytes} bytes early while loading (truncated or replaced after it was verified)",
                hint="something is changing the bundle while it loads; pull or pack it again",
            )
        view = view[n:]


def _loads_strict(raw: bytes) -> Any:
    """json.loads that refuses duplicate keys: two parsers must never read two meanings."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result = {}
        for key, value in items:
            if key in result:
                raise ValueError(f"duplicate key {key!r}")
            result[key] = value
        return result

    return json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)


def _parse_json(raw: bytes) -> tuple[Any, str | None]:
    """(data, None) or (None, why it is not JSON): never raises for any bytes."""
    try:
        return _loads_strict(raw), None
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as exc:  # JSONDecodeError, duplicate keys, integers past Python's digit limit
        return None, str(exc).splitlines()[0][:200]


# --- manifest ----------------------------------------------------------------------------


def manifest_path(bundle_dir: str | os.PathLike) -> Path:
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleNotFoundError(
            f"bundle not found: {bundle} is not a directory",
            hint="pass the directory that `edgepack pack` wrote (it holds edgepack.json)",
        )
    path = bundle / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise BundleNotFoundError(
            f"not an edgepack bundle: {bundle} has no {MANIFEST_NAME}",
            hint="an interrupted `edgepack pack` leaves no manifest; pack the model again",
        )
    if path.is_symlink() or not path.is_file():
        raise ManifestError(
            f"{path} is a symlink or not a regular file",
            hint="a bundle's files are plain files inside it; pull or pack the bundle again",
        )
    return path


def read_manifest_bytes(bundle_dir: str | os.PathLike) -> bytes:
    """The raw bytes of ``edgepack.json`` (what a signature covers), size-capped."""
    path = manifest_path(bundle_dir)
    try:
        with open_regular(path) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{path} is more than the {MAX_MANIFEST_BYTES} bytes a manifest may be",
            hint="the manifest is damaged or not edgepack's; pack the model again",
        )
    return raw


def parse_manifest(raw: bytes, origin: str = MANIFEST_NAME) -> dict[str, Any]:
    data, problem = _parse_json(raw)
    if problem is not None:
        raise ManifestError(
            f"{origin} is not valid JSON ({problem})",
            hint="the manifest is damaged; pull or pack the bundle again",
        )
    return validate_manifest(data, origin=origin)


def read_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate ``edgepack.json``; raise ManifestError listing every problem."""
    return parse_manifest(read_manifest_bytes(bundle_dir), origin=str(Path(bundle_dir) / MANIFEST_NAME))


def validate_manifest(data: Any, origin: str = MANIFEST_NAME) -> dict[str, Any]:
    """Check a parsed manifest against the schema; the version gate comes first, since a
    newer format may legitimately have a different schema."""
    if not isinstance(data, dict):
        raise ManifestError(f"{origin}: the manifest must be a JSON object, not {type(data).__name__}")
    if data.get("format") != FORMAT_NAME:
        raise ManifestError(
            f"{origin}: format is {_short(data.get('format'))}, expected {FORMAT_NAME!r}",
            hint="this is not an edgepack manifest",
        )
    version = data.get("format_version")
    if not _is_int(version) or version not in SUPPORTED_VERSIONS:
        raise ManifestError(
            f"{origin}: bundle format version {_short(version)} is not one this edgepack reads "
            f"(reads {', '.join(map(str, SUPPORTED_VERSIONS))})",
            hint="upgrade edgepack (pip install -U edgepack), or re-pack the model with this version",
        )
    problems = _schema_problems(data)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ManifestError(
            f"{origin}: invalid manifest ({len(problems)} problems): " + "; ".join(shown),
            hint="the manifest is damaged or was edited by hand; pack the model again",
        )
    return data


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    if isinstance(data.get("quantization"), dict):
        problems += _quantization_problems(data["quantization"])
    if isinstance(data.get("memory"), dict):
        problems += _memory_problems(data["memory"])
    if isinstance(data.get("files"), list):
        problems += _files_problems(data["files"])
    if isinstance(data.get("tensors"), dict):
        problems += _tensors_problems(data["tensors"], data.get("files"))
    if isinstance(data.get("device_map"), dict):
        for name, device in data["device_map"].items():
            if not (isinstance(device, str) and device) and not (_is_int(device) and device >= 0):
                problems.append(f"device_map[{_short(name)}] must be a device name or index")
    return problems


def _quantization_problems(quant: dict[str, Any]) -> list[str]:
    problems = []
    for key, typ in _QUANT_KEYS.items():
        value = quant.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            problems.append(f"quantization.{key} must be {typ.__name__}")
    if _is_int(quant.get("bits")) and quant["bits"] not in (16, 8, 4):
        problems.append(f"quantization.bits must be 16, 8 or 4, not {quant['bits']!r}")
    if isinstance(quant.get("compute_dtype"), str) and quant["compute_dtype"] not in COMPUTE_DTYPES:
        problems.append(f"quantization.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}")
    modules = quant.get("quantized_modules", [])
    if not (isinstance(modules, list) and all(isinstance(m, str) and m for m in modules)):
        problems.append("quantization.quantized_modules must be a list of module names")
    if not isinstance(quant.get("kept_modules", {}), dict):
        problems.append("quantization.kept_modules must be an object")
    if quant.get("bits") == 4 and not (_is_int(quant.get("blocksize")) and quant["blocksize"] > 0):
        problems.append("quantization.blocksize must be a positive integer for 4-bit")
    if quant.get("bits") == 4 and quant.get("quant_type") not in QUANT_TYPES_4BIT:
        problems.append(f"quantization.quant_type must be one of {', '.join(QUANT_TYPES_4BIT)} for 4-bit")
    return problems


def _memory_problems(memory: dict[str, Any]) -> list[str]:
    problems = []
    if not (_is_int(memory.get("weight_bytes")) and memory["weight_bytes"] >= 0):
        problems.append("memory.weight_bytes must be a non-negative integer")
    per_device = memory.get("weight_bytes_per_device")
    if not (isinstance(per_device, dict) and all(_is_int(v) and v >= 0 for v in per_device.values())):
        problems.append("memory.weight_bytes_per_device must map devices to non-negative integers")
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
            problems.append(f"{where}.path {_short(rel)} {problem}")
        if rel in UNLISTED_FILES:
            problems.append(f"{where}.path {rel!r} may not be listed (the manifest cannot hash itself)")
        if rel in seen:
            problems.append(f"{where}.path {_short(rel)} is listed twice")
        seen.add(rel)
        size = entry.get("size")
        if not (_is_int(size) and size >= 0):
            problems.append(f"{where}.size must be a non-negative integer")
        digest = entry.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)):
            problems.append(f"{where}.sha256 must be 64 lowercase hex digits")
    return problems


def _tensors_problems(tensors: dict[str, Any], files: Any) -> list[str]:
    listed = set()
    if isinstance(files, list):
        listed = {e["path"] for e in files if isinstance(e, dict) and isinstance(e.get("path"), str)}
    problems = []
    for name, info in tensors.items():
        where = f"tensors[{_short(name)}]"
        if not name:
            problems.append("tensors has an empty tensor name")
        if not isinstance(info, dict):
            problems.append(f"{where} must be an object")
            continue
        file = info.get("file")
        if not isinstance(file, str) or file not in listed:
            problems.append(f"{where}.file {_short(file)} is not a listed file")
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            problems.append(f"{where}.dtype {_short(dtype)} is not a safetensors dtype")
        shape = info.get("shape")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            problems.append(f"{where}.shape must be a list of non-negative integers")
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
            if not stat.S_ISREG(path.lstat().st_mode):
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
    with open_regular(path) as f:
        return read_shard_header(f, path.name, max_header_bytes=max_header_bytes)[0]


def read_shard_header(
    f: IO[bytes], name: str, expected_size: int | None = None, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, Any], int]:
    """Parse and check the safetensors header of an open shard; return (header without
    ``__metadata__``, offset of the data section). ``expected_size``: the size the
    manifest lists, checked again on the open file (it may have changed since verifying)."""
    file_size = os.fstat(f.fileno()).st_size
    if expected_size is not None and file_size != expected_size:
        raise BundleIntegrityError(
            f"{name} is {file_size} bytes while loading, the manifest says {expected_size} "
            "(truncated or replaced after it was verified)",
            hint="something is changing the bundle while it loads; pull or pack it again",
        )
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise BundleIntegrityError(f"{name} is too short to be a safetensors file ({file_size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > max_header_bytes or header_len > file_size - 8:
        raise BundleIntegrityError(
            f"{name} declares a {header_len}-byte safetensors header "
            f"(limit {max_header_bytes}, file {file_size} bytes)",
            hint="the shard is damaged or not one edgepack wrote; pull or pack the bundle again",
        )
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise BundleIntegrityError(f"{name} ended inside its safetensors header (truncated while loading)")
    header, problem = _parse_json(raw)
    if problem is not None:
        raise BundleIntegrityError(f"{name}: safetensors header is not valid JSON ({problem})")
    if not isinstance(header, dict):
        raise BundleIntegrityError(f"{name}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise BundleIntegrityError(f"{name}: safetensors __metadata__ must map strings to strings")
    _check_tensor_ranges(name, header, file_size - 8 - header_len)
    return header, 8 + header_len


def _check_tensor_ranges(name: str, header: dict[str, Any], data_bytes: int) -> None:
    ranges = []
    for tensor, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise BundleIntegrityError(f"{name}: tensor {_short(tensor)} has a malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not (
            isinstance(dtype, str) and dtype in DTYPE_BYTES
            and isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
        ):  # fmt: skip
            raise BundleIntegrityError(f"{name}: tensor {_short(tensor)} has a malformed header entry")
        start, end = offsets
        if not 0 <= start <= end <= data_bytes:
            raise BundleIntegrityError(f"{name}: tensor {_short(tensor)} points outside the file")
        numel = 1
        for dim in shape:
            numel *= dim
        expected = numel * DTYPE_BYTES[dtype]
        if end - start != expected:
            raise BundleIntegrityError(
                f"{name}: tensor {_short(tensor)} holds {end - start} bytes but {dtype}{shape} needs {expected}"
            )
        ranges.append((start, end, tensor))
    ranges.sort()
    furthest = 0  # overlaps first: two tensors sharing bytes is the crafted case, a gap its side effect
    for start, end, tensor in ranges:
        if start < furthest:
            raise BundleIntegrityError(f"{name}: tensor {_short(tensor)} overlaps another tensor (damaged or crafted shard)")
        furthest = max(furthest, end)
    position = 0
    for start, end, tensor in ranges:
        if start != position:
            raise BundleIntegrityError(f"{name}: tensor {_short(tensor)} leaves a gap before it (damaged or crafted shard)")
        position = end
    if position != data_bytes:
        raise BundleIntegrityError(f"{name}: {data_bytes - position} trailing bytes after the last tensor")


def check_shard_header(rel: str, header: dict[str, Any], manifest: dict[str, Any]) -> None:
    """One shard's (already range-checked) header agrees with the manifest's tensor table."""
    expected = manifest["tensors"]
    for tensor, info in header.items():
        want = expected.get(tensor)
        if want is None or want["file"] != rel:
            raise BundleIntegrityError(f"{rel}: tensor {_short(tensor)} is not in the manifest's tensor table")
        if info["dtype"] != want["dtype"] or info["shape"] != want["shape"]:
            raise BundleIntegrityError(
                f"{rel}: tensor {_short(tensor)} is {info['dtype']}{info['shape']}, "
                f"the manifest says {want['dtype']}{want['shape']}",
                hint="the manifest and the weights disagree; pull or pack the bundle again",
            )


def shard_files(manifest: dict[str, Any]) -> list[str]:
    return sorted({info["file"] for info in manifest["tensors"].values()})


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
            f"{len(missing)} tensors listed in the manifest are in no shard (first: {_short(missing[0])})"
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
    config, problem = _parse_json(raw) if len(raw) <= MAX_CONFIG_BYTES else (None, "too large")
    if problem is not None or not isinstance(config, dict):
        raise BundleIntegrityError(f"{CONFIG_NAME} is not a JSON object ({problem or 'wrong type'})")
    if not _is_int(config.get("vocab_size")) and isinstance(config.get("text_config"), dict):
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
    hidden = next((config[k] for k in _HIDDEN_KEYS if _is_int(config.get(k))), None)
    for name, info in tensors.items():
        if name.endswith(_EMBEDDING_SUFFIXES) and name.rsplit(".", 1)[0] not in quantized:
            if _is_int(vocab) and _is_int(hidden) and info["shape"] != [vocab, hidden]:
                problems.append(
                    f"vocab_size {vocab} and hidden size {hidden} need {name} of shape {[vocab, hidden]}, "
                    f"the weights hold {info['shape']}"
                )
    layers = next((config[k] for k in _LAYER_KEYS if _is_int(config.get(k))), None)
    indices = {int(m.group(1)) for name in tensors if (m := _LAYER_INDEX.search(name))}
    # indices == {0, ..., layers - 1}, without building that set (a crafted config may say 10**9)
    if layers is not None and indices and (len(indices) != layers or min(indices) != 0 or max(indices) != layers - 1):
        problems.append(f"it describes {layers} layers, the weights hold layers {_short(sorted(indices))}")
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
    bundle_dir: str | os.PathLike, check_hashes: bool | str = True, *, manifest_bytes: bytes | None = None
) -> dict[str, Any]:
    """Run every check on a bundle and return its manifest.

    ``check_hashes``: True hashes every file; False checks sizes only; ``"once"`` hashes on
    the first load and then trusts files whose size, mtime, inode and ctime are unchanged (a record
    kept under ~/.cache/edgepack/verified, or $EDGEPACK_CACHE). ``manifest_bytes``: verify
    against these bytes of edgepack.json (already read, e.g. to check a signature over
    them) instead of reading it again. Every failure, an unreadable file included, is an
    EdgepackError.
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
        check_files(bundle, manifest, check_hashes=bool(check_hashes))
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
