"""How much memory this process may still use: the smaller of what the box has free and
what its cgroup (container, systemd slice, `docker run -m`) still allows.

psutil.virtual_memory() reads /proc/meminfo, which knows nothing of cgroup limits: in a
container limited to 1 GiB on a 64 GiB host it reports ~60 GiB available, and a load
that trusts it is OOM-killed half-way. So the limit of this process's memory cgroup (and
of each ancestor, since a parent's limit binds its children) is read as well:

* cgroup v2: the ``0::/path`` line of /proc/self/cgroup, the cgroup2 mount in
  /proc/self/mountinfo; ``memory.max`` / ``memory.current`` / ``inactive_file``.
* cgroup v1: the line whose controllers include ``memory``, a ``cgroup`` mount whose
  options include ``memory``; ``memory.limit_in_bytes`` / ``memory.usage_in_bytes`` /
  ``total_inactive_file``.

The mount's root (4th field of mountinfo) is stripped from the cgroup path, so this works
inside containers that mount only their own subtree, and with a hierarchy mounted twice.
Only the standard library and psutil; reads only, never writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# cgroup v1 writes "no limit" as the largest page-aligned 63-bit number.
_UNLIMITED_BYTES = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    limit_bytes: int
    usage_bytes: int  # charged to the group, minus page cache it can drop (inactive_file)
    path: str  # the cgroup directory whose limit is the tightest

    @property
    def headroom_bytes(self) -> int:
        return max(0, self.limit_bytes - self.usage_bytes)


@dataclass(frozen=True)
class MemoryBudget:
    available_bytes: int  # what this process may still allocate
    source: str  # "RAM" or "cgroup limit"
    cgroup: CgroupMemory | None


def budget(proc: str = "/proc/self") -> MemoryBudget:
    """What this process may still allocate, and which bound it came from."""
    import psutil

    ram = psutil.virtual_memory().available
    group = cgroup_memory(proc)
    if group is not None and group.headroom_bytes < ram:
        return MemoryBudget(group.headroom_bytes, "cgroup limit", group)
    return MemoryBudget(ram, "RAM", group)


def cgroup_memory(proc: str = "/proc/self") -> CgroupMemory | None:
    """The tightest memory limit of this process's cgroup and its ancestors, or None when
    no limit applies (or the files cannot be read: then only RAM counts)."""
    try:
        memberships = Path(proc, "cgroup").read_text().splitlines()
        mounts = Path(proc, "mountinfo").read_text().splitlines()
    except OSError:
        return None
    tightest = None
    for group_dir, version in _memory_cgroup_dirs(memberships, mounts):
        for directory in _up_to_mount(group_dir):
            found = _read_group(directory, version)
            if found is not None and (tightest is None or found.headroom_bytes < tightest.headroom_bytes):
                tightest = found
        if tightest is not None:
            return tightest
    return None


def _memory_cgroup_dirs(memberships: list[str], mounts: list[str]) -> list[tuple[tuple[Path, Path], int]]:
    """(cgroup directory, its mount point) pairs for the memory controller, v1 first
    (when the v1 controller is mounted, v2's has no memory files)."""
    v1_path = v2_path = None
    for line in memberships:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if "memory" in controllers.split(","):
            v1_path = path
        elif hier == "0" and controllers == "":
            v2_path = path
    found = []
    for line in mounts:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup" and "memory" in options and v1_path is not None:
            path, version = v1_path, 1
        elif fstype == "cgroup2" and v2_path is not None:
            path, version = v2_path, 2
        else:
            continue
        if path == root or path.startswith(root.rstrip("/") + "/"):
            relative = path[len(root.rstrip("/")) :].lstrip("/")
            found.append(((Path(mount_point) / relative, Path(mount_point)), version))
    return sorted(found, key=lambda item: item[1])


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _up_to_mount(dirs: tuple[Path, Path]) -> list[Path]:
    directory, mount_point = dirs
    chain = [directory]
    while chain[-1] != mount_point and chain[-1].parent != chain[-1]:
        chain.append(chain[-1].parent)
    return chain


def _read_group(directory: Path, version: int) -> CgroupMemory | None:
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if version == 1 else (
        "memory.max", "memory.current", "inactive_file")
    try:
        limit_text = (directory / names[0]).read_text().strip()
        if limit_text == "max" or int(limit_text) >= _UNLIMITED_BYTES:
            return None
        usage = int((directory / names[1]).read_text().strip())
    except (OSError, ValueError):
        return None
    inactive = _stat_value(directory / "memory.stat", names[2])
    return CgroupMemory(int(limit_text), max(0, usage - inactive), str(directory))


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def evict_page_cache(paths: Iterable[str | os.PathLike]) -> None:
    """Ask the kernel to drop the cached pages of these files. A cgroup is charged for the
    page cache of what its processes read (verifying a bundle reads all of it), which would
    make a box that can hold the bundle look full. Best effort: no-op where unsupported."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def process_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and RSS with it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do
