"""Putting a new bundle folder in place without losing anything: ``pack -o`` and ``pull -o``.

A folder edgepack writes into is replaced only when it is empty or an edgepack bundle: a
manifest that validates, and nothing in the folder but the files it lists and edgepack's
side files (edgepack.json, edgepack.sig). Anything else is refused and left untouched.

The new bundle is written into a temporary sibling ``.OUT.tmp-PID`` that holds a marker
(bundle.UNFINISHED_NAME, which verify refuses) from its first moment, verified there,
unmarked, and only then swapped in: in one step where the kernel can exchange two names
(Linux renameat2), else by renaming the old bundle aside first. Whenever a run dies, OUT
holds the old bundle or the new one, and the next run removes the temporaries a dead run
left: only folders that carry the marker or are bundles, never a look-alike of yours.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path, PurePosixPath

from edgepack.format import bundle as bundle_format
from edgepack.errors import EdgepackError, OutputExistsError

# Temporaries edgepack leaves beside OUT: ".OUT.tmp-PID" (being written), ".OUT.old-PID" (the
# replaced bundle, set aside), ".OUT.pull-PID" (what earlier versions of pull wrote).
_TEMP_KINDS = ("tmp", "old", "pull")
_SHOWN_NAMES = 3  # entries named in the refusal, so one line stays readable


def check_replaceable(out: Path, *, hint: str) -> None:
    """Raise OutputExistsError unless ``out`` is absent, an empty folder or an edgepack bundle."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"{out} exists and is not a folder; nothing was changed", hint=hint)
    problem = _not_a_bundle(out) if out.exists() else None
    if problem is not None:
        raise OutputExistsError(f"{out} is not empty and is not an edgepack bundle: {problem}; nothing was changed",
                                hint=hint)


def _not_a_bundle(folder: Path) -> str | None:
    """None when ``folder`` is empty or a bundle (damaged files allowed: it is replaced), else why not."""
    entries = sorted(os.listdir(folder))
    if not entries:
        return None
    try:
        manifest = bundle_format.read_manifest(folder)
    except EdgepackError:
        shown = ", ".join(entries[:_SHOWN_NAMES]) + (f" and {len(entries) - _SHOWN_NAMES} more" if len(entries) > _SHOWN_NAMES else "")
        return f"it holds {shown} and no valid {bundle_format.MANIFEST_NAME}"
    files = {e["path"] for e in manifest["files"]} | set(bundle_format.UNLISTED_FILES)
    dirs = {str(parent) for rel in files for parent in PurePosixPath(rel).parents} - {"."}
    foreign = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for name in sorted(dirnames):
            rel = (base / name).relative_to(folder).as_posix()
            if (base / name).is_symlink() or rel not in dirs:
                foreign.append(rel + "/")
                dirnames.remove(name)  # not descended into: it is not the bundle's
        for name in sorted(filenames):
            rel = (base / name).relative_to(folder).as_posix()
            if rel not in files or not stat.S_ISREG((base / name).lstat().st_mode):
                foreign.append(rel)
    if not foreign:
        return None
    shown = ", ".join(foreign[:_SHOWN_NAMES]) + (f" and {len(foreign) - _SHOWN_NAMES} more" if len(foreign) > _SHOWN_NAMES else "")
    return f"{shown} {'is' if len(foreign) == 1 else 'are'} not part of it"


def make_temp(out: Path) -> Path:
    """A new, marked temporary folder beside ``out`` (after removing a dead run's)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists() or tmp.is_symlink():
        if not _is_edgepacks(tmp):
            raise OutputExistsError(f"{tmp} is in the way and was not made by edgepack",
                                    hint="move it elsewhere, then run the same command again")
        shutil.rmtree(tmp)
    tmp.mkdir()
    # Created with 0666 like any file, so its mode is the umask's: publish() copies it.
    fd = os.open(tmp / bundle_format.UNFINISHED_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"pid": os.getpid()}) + "\n")
    return tmp


def remove_stale_temps(out: Path) -> None:
    """Remove what a dead pack or pull of the same OUT left: folders named like its
    temporaries whose process is gone and that edgepack made (marker, or a bundle)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:{'|'.join(_TEMP_KINDS)})-(\d+)\Z")
    for name in os.listdir(out.parent):
        match = pattern.match(name)
        path = out.parent / name
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            if _is_edgepacks(path):
                shutil.rmtree(path, ignore_errors=True)


def _is_edgepacks(path: Path) -> bool:
    if path.is_symlink() or not path.is_dir():
        return False
    if (path / bundle_format.UNFINISHED_NAME).is_file():
        return True
    return (path / bundle_format.MANIFEST_NAME).is_file() and _not_a_bundle(path) is None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: Path, out: Path, *, hint: str) -> None:
    """Swap the finished, verified bundle in ``tmp`` into place at ``out``.

    ``out`` is checked again (a long pack gives time to put a file there); its files get the
    umask's modes (some writers, mkstemp-style, create 0600); the marker goes last, then the
    swap, so a bundle is never unmarked before it is complete."""
    check_replaceable(out, hint=hint)
    marker = tmp / bundle_format.UNFINISHED_NAME
    file_mode = stat.S_IMODE(marker.stat().st_mode)
    dir_mode = stat.S_IMODE(tmp.stat().st_mode)
    for path in tmp.rglob("*"):
        mode = dir_mode if path.is_dir() else file_mode
        if not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) != mode:
            try:
                os.chmod(path, mode)
            except PermissionError:
                pass  # a pulled file hard-linked to another user's Hub cache keeps that cache's mode
    marker.unlink()
    _fsync_dir(tmp)
    if out.exists() and any(out.iterdir()):
        if _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old bundle
        else:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the old bundle goes back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)  # rename(2) takes an empty folder's place, or fails: never a full one
    _fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE, Linux 3.15+, glibc 2.28+);
    False where this system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
