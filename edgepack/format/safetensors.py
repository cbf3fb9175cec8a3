"""safetensors headers read without the safetensors package, and checked before a byte of
tensor data is touched: header size capped, every dtype known, every byte range inside the
file, consistent with its dtype and shape, neither overlapping nor leaving holes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import IO, Any

from edgepack.errors import BundleIntegrityError
from edgepack.format.files import is_int, open_regular, parse_json, short_repr

# safetensors allows 100 MB headers; ours hold a few hundred tensor entries (~100 kB), so
# anything past 16 MiB is damage or an attack, refused before it is read into memory.
MAX_HEADER_BYTES = 16 * 1024 * 1024

# safetensors dtype name -> bytes per element
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


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
    header, problem = parse_json(raw)
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
            raise BundleIntegrityError(f"{name}: tensor {short_repr(tensor)} has a malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not (
            isinstance(dtype, str) and dtype in DTYPE_BYTES
            and isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
        ):
            raise BundleIntegrityError(f"{name}: tensor {short_repr(tensor)} has a malformed header entry")
        start, end = offsets
        if not 0 <= start <= end <= data_bytes:
            raise BundleIntegrityError(f"{name}: tensor {short_repr(tensor)} points outside the file")
        numel = 1
        for dim in shape:
            numel *= dim
        expected = numel * DTYPE_BYTES[dtype]
        if end - start != expected:
            raise BundleIntegrityError(
                f"{name}: tensor {short_repr(tensor)} holds {end - start} bytes but {dtype}{shape} needs {expected}"
            )
        ranges.append((start, end, tensor))
    ranges.sort()
    furthest = 0  # overlaps first: two tensors sharing bytes is the crafted case, a gap its side effect
    for start, end, tensor in ranges:
        if start < furthest:
            raise BundleIntegrityError(f"{name}: tensor {short_repr(tensor)} overlaps another tensor (damaged or crafted shard)")
        furthest = max(furthest, end)
    position = 0
    for start, end, tensor in ranges:
        if start != position:
            raise BundleIntegrityError(f"{name}: tensor {short_repr(tensor)} leaves a gap before it (damaged or crafted shard)")
        position = end
    if position != data_bytes:
        raise BundleIntegrityError(f"{name}: {data_bytes - position} trailing bytes after the last tensor")


def check_shard_header(rel: str, header: dict[str, Any], manifest: dict[str, Any]) -> None:
    """One shard's (already range-checked) header agrees with the manifest's tensor table."""
    expected = manifest["tensors"]
    for tensor, info in header.items():
        want = expected.get(tensor)
        if want is None or want["file"] != rel:
            raise BundleIntegrityError(f"{rel}: tensor {short_repr(tensor)} is not in the manifest's tensor table")
        if info["dtype"] != want["dtype"] or info["shape"] != want["shape"]:
            raise BundleIntegrityError(
                f"{rel}: tensor {short_repr(tensor)} is {info['dtype']}{info['shape']}, "
                f"the manifest says {want['dtype']}{want['shape']}",
                hint="the manifest and the weights disagree; pull or pack the bundle again",
            )


def shard_files(manifest: dict[str, Any]) -> list[str]:
    return sorted({info["file"] for info in manifest["tensors"].values()})
