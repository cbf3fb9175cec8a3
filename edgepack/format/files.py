"""Reading and writing a bundle's files safely: plain files only (no symlink, no FIFO), hashed
in chunks, JSON written atomically and read strictly (duplicate keys refused), reads that
notice a file shrinking under them. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from edgepack.errors import BundleIntegrityError

HASH_CHUNK_BYTES = 4 * 1024 * 1024


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters: a crafted name or value must not flood a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The file's sha256; ``on_bytes(n)`` after each chunk of n bytes (for progress)."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
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


def parse_json(raw: bytes) -> tuple[Any, str | None]:
    """(data, None) or (None, why it is not JSON): never raises for any bytes."""
    try:
        return _loads_strict(raw), None
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as exc:  # JSONDecodeError, duplicate keys, integers past Python's digit limit
        return None, str(exc).splitlines()[0][:200]
