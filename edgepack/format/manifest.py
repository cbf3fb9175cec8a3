"""The manifest (``edgepack.json``): its schema, the version gate, reading and validating it.

A manifest is parsed strictly and validated whole, every problem listed at once; its version
is checked first, since a newer format may legitimately have a different schema.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from edgepack.errors import BundleNotFoundError, ManifestError
from edgepack.format.files import is_int, open_regular, parse_json, short_repr
from edgepack.format.safetensors import DTYPE_BYTES

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
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")

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
    data, problem = parse_json(raw)
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
            f"{origin}: format is {short_repr(data.get('format'))}, expected {FORMAT_NAME!r}",
            hint="this is not an edgepack manifest",
        )
    version = data.get("format_version")
    if not is_int(version) or version not in SUPPORTED_VERSIONS:
        raise ManifestError(
            f"{origin}: bundle format version {short_repr(version)} is not one this edgepack reads "
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
    if isinstance(data.get("quantization"), dict) and "tables" in data["quantization"]:
        problems += _tables_problems(data["quantization"]["tables"], data.get("tensors"))
    if isinstance(data.get("device_map"), dict):
        for name, device in data["device_map"].items():
            if not (isinstance(device, str) and device) and not (is_int(device) and device >= 0):
                problems.append(f"device_map[{short_repr(name)}] must be a device name or index")
    return problems


def _quantization_problems(quant: dict[str, Any]) -> list[str]:
    problems = []
    for key, typ in _QUANT_KEYS.items():
        value = quant.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            problems.append(f"quantization.{key} must be {typ.__name__}")
    if is_int(quant.get("bits")) and quant["bits"] not in (16, 8, 4):
        problems.append(f"quantization.bits must be 16, 8 or 4, not {quant['bits']!r}")
    if isinstance(quant.get("compute_dtype"), str) and quant["compute_dtype"] not in COMPUTE_DTYPES:
        problems.append(f"quantization.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}")
    modules = quant.get("quantized_modules", [])
    if not (isinstance(modules, list) and all(isinstance(m, str) and m for m in modules)):
        problems.append("quantization.quantized_modules must be a list of module names")
    if not isinstance(quant.get("kept_modules", {}), dict):
        problems.append("quantization.kept_modules must be an object")
    if quant.get("bits") == 4 and not (is_int(quant.get("blocksize")) and quant["blocksize"] > 0):
        problems.append("quantization.blocksize must be a positive integer for 4-bit")
    if quant.get("bits") == 4 and quant.get("quant_type") not in QUANT_TYPES_4BIT:
        problems.append(f"quantization.quant_type must be one of {', '.join(QUANT_TYPES_4BIT)} for 4-bit")
    return problems


# 8-bit tables (FORMAT.md): the scheme names each module's scale tensor, its dtype, and its
# shape from the weight's [rows, cols]
TABLE_SCALES = {
    "int8-rowwise": (".SCB", "F32", lambda rows, cols: [rows]),
    "int8-block32": (".weight.scales", "F16", lambda rows, cols: [rows, cols // 32] if cols % 32 == 0 else None),
}
TABLE_SCHEMES = tuple(TABLE_SCALES)


def _tables_problems(tables: Any, tensors: Any) -> list[str]:
    """quantization.tables (optional; absent: the embedding table and output layer are
    16-bit): {"bits": 8, "scheme": "int8-block32" or "int8-rowwise", "modules": [...]},
    each module stored as ``M.weight`` I8 [rows, cols] and its scales (TABLE_SCALES)."""
    if not isinstance(tables, dict):
        return ["quantization.tables must be an object"]
    problems = []
    if tables.get("bits") != 8 or isinstance(tables.get("bits"), bool):
        problems.append(f"quantization.tables.bits must be 8, not {short_repr(tables.get('bits'))}")
    scheme = tables.get("scheme")
    if scheme not in TABLE_SCHEMES:
        problems.append(f"quantization.tables.scheme must be one of {', '.join(TABLE_SCHEMES)}")
    modules = tables.get("modules")
    if not (isinstance(modules, list) and modules and all(isinstance(m, str) and m for m in modules)):
        return problems + ["quantization.tables.modules must be a non-empty list of module names"]
    if not isinstance(tensors, dict) or scheme not in TABLE_SCHEMES:
        return problems
    suffix, dtype, scale_shape = TABLE_SCALES[scheme]
    for module in modules:
        weight, scales = tensors.get(module + ".weight"), tensors.get(module + suffix)
        if not (isinstance(weight, dict) and isinstance(scales, dict)):
            problems.append(f"quantization.tables: {short_repr(module)} has no .weight and {suffix} tensors")
            continue
        shape = weight.get("shape")
        ok = isinstance(shape, list) and len(shape) == 2 and all(is_int(n) and n > 0 for n in shape)
        if not ok:  # a malformed shape: _tensors_problems names it
            continue
        if weight.get("dtype") != "I8" or scales.get("dtype") != dtype or scales.get("shape") != scale_shape(*shape):
            want = "[rows]" if scheme == "int8-rowwise" else "[rows, cols / 32] (cols a multiple of 32)"
            problems.append(f"quantization.tables: {short_repr(module)} must be I8 [rows, cols] with {suffix[1:]} {dtype} {want}")
    return problems


def _memory_problems(memory: dict[str, Any]) -> list[str]:
    problems = []
    if not (is_int(memory.get("weight_bytes")) and memory["weight_bytes"] >= 0):
        problems.append("memory.weight_bytes must be a non-negative integer")
    per_device = memory.get("weight_bytes_per_device")
    if not (isinstance(per_device, dict) and all(is_int(v) and v >= 0 for v in per_device.values())):
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
            problems.append(f"{where}.path {short_repr(rel)} {problem}")
        if rel in UNLISTED_FILES:
            problems.append(f"{where}.path {rel!r} may not be listed (the manifest cannot hash itself)")
        if rel in seen:
            problems.append(f"{where}.path {short_repr(rel)} is listed twice")
        seen.add(rel)
        size = entry.get("size")
        if not (is_int(size) and size >= 0):
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
        where = f"tensors[{short_repr(name)}]"
        if not name:
            problems.append("tensors has an empty tensor name")
        if not isinstance(info, dict):
            problems.append(f"{where} must be an object")
            continue
        file = info.get("file")
        if not isinstance(file, str) or file not in listed:
            problems.append(f"{where}.file {short_repr(file)} is not a listed file")
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            problems.append(f"{where}.dtype {short_repr(dtype)} is not a safetensors dtype")
        shape = info.get("shape")
        if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
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
