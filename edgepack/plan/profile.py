"""Device profiles: what a target box has, and how much of it a model may use.

A profile is one JSON file (schema ``edgepack-profile/1``). Built-in ones live in the
repo's ``profiles/`` folder, one per device, named ``<name>.json``; ``probe.probe()``
writes one for the machine it runs on. Every figure is in bytes. "Usable" means physical minus what
the OS, the driver and the CUDA context keep for themselves (``*_reserved_bytes``).

On a unified-memory box (Jetson) CPU and GPU share one pool: ``gpus[0].memory_bytes``
equals ``ram_bytes`` and the GPU's reserve includes the OS's, so count the pool once.

``memory_bandwidth`` (top level: the CPU's read of RAM; in each GPU: its memory's) is what
bounds decoding, which reads every weight once a token (plan/speed.py). It is optional: a
profile written before it existed loads, and plans without a speed.

    >>> from edgepack.plan.profile import load_profile
    >>> p = load_profile("rpi5-8gb")           # or a path: load_profile("mybox.json")
    >>> p.ram_usable_bytes // 2**20
    7680

Loading a profile reads JSON only (standard library); probe.py reads this box and writes
one, and cli/profile.py holds the `edgepack profile` / `edgepack profiles` commands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import ProfileError

PROFILE_SCHEMA = "edgepack-profile/1"
GIB = 1 << 30

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
_COMPUTE_RE = re.compile(r"\d+\.\d+\Z")
_KEYS = ("schema", "name", "description", "source", "cpu", "ram_bytes", "ram_reserved_bytes",
         "reserved_note", "swap_bytes", "unified_memory", "gpus", "disk_free_bytes",
         "bitsandbytes", "probed", "memory_bandwidth")
# how a bandwidth figure was obtained: a streaming read timed on the device, the memory's
# peak transfer rate x bus width from its spec, or an estimate from either (said how)
BANDWIDTH_BASES = ("measured", "theoretical", "estimated")
_FIX_HINT = "compare with a built-in profile: `edgepack profiles --json` prints them all"


def profiles_dir() -> Path:
    """The built-in profiles folder; EDGEPACK_PROFILES_DIR overrides it."""
    override = os.environ.get("EDGEPACK_PROFILES_DIR")
    if override:
        return Path(override)
    checkout = Path(__file__).resolve().parents[2] / "profiles"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "edgepack" / "profiles"  # installed from a wheel


# --- the profile -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CPU:
    arch: str  # platform.machine(), normalized: x86_64, aarch64
    cores: int  # logical CPUs the OS schedules on (vCPUs on a cloud instance)
    model: str
    simd: tuple[str, ...]  # avx2, avx512f, ... / neon, asimd, dotprod, sve, i8mm, bf16


@dataclass(frozen=True)
class MemoryBandwidth:
    """What bounds decoding: every weight is read once per token. Optional in a profile
    (older files have none; ``edgepack profile`` measures it)."""

    read_bytes_per_s: int  # what the planner divides by: a streaming read of the whole memory
    basis: str  # measured | theoretical | estimated (BANDWIDTH_BASES)
    theoretical_bytes_per_s: int | None  # the spec's peak (transfers/s x bus bytes), if known
    source: str  # where the figures come from


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    reserved_bytes: int  # CUDA context, display, driver: never available to a model
    compute_capability: str  # "8.6"
    bf16: bool
    memory_bandwidth: MemoryBandwidth | None = None

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserved_bytes


@dataclass(frozen=True)
class BitsAndBytesSupport:
    """Whether bitsandbytes kernels work there; None means unknown."""

    cpu: bool | None
    cuda: bool | None


@dataclass(frozen=True)
class ProbeInfo:
    at: str  # ISO 8601
    host: str
    available_ram_bytes: int
    torch: str | None
    bitsandbytes_error: str | None


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    source: str
    cpu: CPU
    ram_bytes: int
    ram_reserved_bytes: int
    reserved_note: str
    swap_bytes: int
    unified_memory: bool
    gpus: tuple[GPU, ...]
    disk_free_bytes: int | None
    bitsandbytes: BitsAndBytesSupport
    probed: ProbeInfo | None = None
    memory_bandwidth: MemoryBandwidth | None = None  # the CPU's (RAM)
    origin: str = field(default="<dict>", compare=False)  # where it was loaded from, for messages

    @property
    def ram_usable_bytes(self) -> int:
        return self.ram_bytes - self.ram_reserved_bytes

    def gpu_usable_bytes(self, i: int = 0) -> int:
        """Usable bytes on cuda:i. On a unified box this is the shared pool, not extra RAM."""
        return self.gpus[i].usable_bytes

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        cpu = dataclasses.asdict(self.cpu)
        cpu["simd"] = list(self.cpu.simd)
        return {
            "schema": PROFILE_SCHEMA,
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "cpu": cpu,
            "ram_bytes": self.ram_bytes,
            "ram_reserved_bytes": self.ram_reserved_bytes,
            "reserved_note": self.reserved_note,
            "swap_bytes": self.swap_bytes,
            "unified_memory": self.unified_memory,
            "gpus": [_gpu_dict(g) for g in self.gpus],
            "disk_free_bytes": self.disk_free_bytes,
            "bitsandbytes": dataclasses.asdict(self.bitsandbytes),
            "probed": dataclasses.asdict(self.probed) if self.probed else None,
            **({"memory_bandwidth": dataclasses.asdict(self.memory_bandwidth)} if self.memory_bandwidth else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, origin: str = "<dict>", expected_name: str | None = None) -> DeviceProfile:
        """Validate every field, then raise one ProfileError listing all the problems."""
        if not isinstance(d, dict):
            raise ProfileError(f"profile {origin}: must be a JSON object, got {type(d).__name__}", _FIX_HINT)
        v = _Validator()
        v.unknown_keys(d, _KEYS, "")
        schema = d.get("schema")
        if schema != PROFILE_SCHEMA:
            v.problems.append("schema missing" if schema is None
                              else f"schema must be {PROFILE_SCHEMA!r}, got {_short(schema)}")
        name = v.get(d, "name", is_profile_name, "lowercase letters, digits and '-'")
        if name is not None and expected_name is not None and name != expected_name:
            v.problems.append(f"name is {name!r} but the file is {expected_name}.json")
        profile = dict(
            name=name,
            description=v.get(d, "description", _is_text, "a non-empty string"),
            source=v.get(d, "source", _is_text, "a non-empty string"),
            cpu=_cpu(v, d),
            ram_bytes=v.get(d, "ram_bytes", _is_pos_int, "a positive integer"),
            ram_reserved_bytes=v.get(d, "ram_reserved_bytes", _is_nonneg_int, "a non-negative integer"),
            reserved_note=v.get(d, "reserved_note", _is_str, "a string"),
            swap_bytes=v.get(d, "swap_bytes", _is_nonneg_int, "a non-negative integer"),
            unified_memory=v.get(d, "unified_memory", _is_bool, "true or false"),
            gpus=_gpus(v, d),
            disk_free_bytes=v.get(d, "disk_free_bytes", _opt(_is_nonneg_int), "a non-negative integer or null"),
            bitsandbytes=_bitsandbytes(v, d),
            probed=_probed(v, d),
            memory_bandwidth=_bandwidth(v, d, ""),
        )
        _check_across(v, **profile)
        if v.problems:
            raise ProfileError(f"profile {origin}: " + "; ".join(v.problems), _FIX_HINT)
        return cls(**profile, origin=origin)


# --- validation --------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a byte count


def _is_pos_int(x: Any) -> bool:
    return _is_int(x) and x > 0


def _is_nonneg_int(x: Any) -> bool:
    return _is_int(x) and x >= 0


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _is_text(x: Any) -> bool:
    return isinstance(x, str) and bool(x.strip())


def is_profile_name(x: Any) -> bool:
    return isinstance(x, str) and bool(_NAME_RE.match(x))


def _opt(check):
    return lambda x: x is None or check(x)


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


class _Validator:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def get(self, d: dict, key: str, check, expected: str, prefix: str = "") -> Any:
        """d[key] if it passes check, else None with the problem recorded."""
        if key not in d:
            self.problems.append(f"{prefix}{key} missing")
            return None
        if not check(d[key]):
            self.problems.append(f"{prefix}{key} must be {expected}, got {_short(d[key])}")
            return None
        return d[key]

    def unknown_keys(self, d: dict, known: tuple[str, ...], prefix: str) -> None:
        for key in d:
            if key not in known:
                self.problems.append(f"{prefix}{key}: unknown key")


def _cpu(v: _Validator, d: dict) -> CPU | None:
    cpu = v.get(d, "cpu", lambda x: isinstance(x, dict), "an object")
    if cpu is None:
        return None
    before = len(v.problems)
    v.unknown_keys(cpu, ("arch", "cores", "model", "simd"), "cpu.")
    arch = v.get(cpu, "arch", _is_text, "a non-empty string", "cpu.")
    cores = v.get(cpu, "cores", _is_pos_int, "a positive integer", "cpu.")
    model = v.get(cpu, "model", _is_str, "a string", "cpu.")
    simd = v.get(cpu, "simd", lambda x: isinstance(x, list) and all(map(_is_text, x)),
                 "a list of strings", "cpu.")
    return None if len(v.problems) > before else CPU(arch, cores, model, tuple(simd))


def _gpus(v: _Validator, d: dict) -> tuple[GPU, ...] | None:
    gpus = v.get(d, "gpus", lambda x: isinstance(x, list), "a list")
    if gpus is None:
        return None
    before = len(v.problems)
    out = []
    for i, g in enumerate(gpus):
        p = f"gpus[{i}]."
        if not isinstance(g, dict):
            v.problems.append(f"gpus[{i}] must be an object, got {_short(g)}")
            continue
        v.unknown_keys(g, ("name", "memory_bytes", "reserved_bytes", "compute_capability", "bf16", "memory_bandwidth"), p)
        name = v.get(g, "name", _is_text, "a non-empty string", p)
        memory = v.get(g, "memory_bytes", _is_pos_int, "a positive integer", p)
        reserved = v.get(g, "reserved_bytes", _is_nonneg_int, "a non-negative integer", p)
        cc = v.get(g, "compute_capability", lambda x: isinstance(x, str) and bool(_COMPUTE_RE.match(x)),
                   "a string like '8.6'", p)
        bf16 = v.get(g, "bf16", _is_bool, "true or false", p)
        if memory is not None and reserved is not None and reserved >= memory:
            v.problems.append(f"{p}reserved_bytes ({reserved}) must be less than memory_bytes ({memory})")
        out.append(GPU(name, memory, reserved, cc, bf16, _bandwidth(v, g, p)))
    return None if len(v.problems) > before else tuple(out)


def _check_across(v: _Validator, ram_bytes, ram_reserved_bytes, unified_memory, gpus, bitsandbytes,
                  **_) -> None:
    """Checks that span fields; each runs only when its fields were valid on their own."""
    ram, reserved = ram_bytes, ram_reserved_bytes
    if ram is not None and reserved is not None and reserved >= ram:
        v.problems.append(f"ram_reserved_bytes ({reserved}) must be less than ram_bytes ({ram})")
    if gpus is not None and bitsandbytes is not None and bitsandbytes.cuda and not gpus:
        v.problems.append("bitsandbytes.cuda is true but gpus is empty")
    if not unified_memory or gpus is None:
        return
    # One pool: a planner that added RAM and GPU memory would count it twice.
    if len(gpus) != 1:
        v.problems.append(f"unified_memory needs exactly one GPU, got {len(gpus)}")
        return
    if ram is not None and gpus[0].memory_bytes != ram:
        v.problems.append(f"unified_memory: gpus[0].memory_bytes ({gpus[0].memory_bytes}) must equal "
                          f"ram_bytes ({ram})")
    if reserved is not None and gpus[0].reserved_bytes < reserved:
        v.problems.append(f"unified_memory: gpus[0].reserved_bytes ({gpus[0].reserved_bytes}) must be at "
                          f"least ram_reserved_bytes ({reserved}), the OS uses the same pool")


def _gpu_dict(g: GPU) -> dict[str, Any]:
    d = dataclasses.asdict(g)
    if g.memory_bandwidth is None:  # absent, as in the files written before the field existed
        del d["memory_bandwidth"]
    return d


def _bandwidth(v: _Validator, d: dict, prefix: str) -> MemoryBandwidth | None:
    """The optional memory_bandwidth object: absent or null means not known."""
    bw = d.get("memory_bandwidth")
    if bw is None:
        return None
    p = f"{prefix}memory_bandwidth."
    if not isinstance(bw, dict):
        v.problems.append(f"{prefix}memory_bandwidth must be an object or null, got {_short(bw)}")
        return None
    before = len(v.problems)
    v.unknown_keys(bw, ("read_bytes_per_s", "basis", "theoretical_bytes_per_s", "source"), p)
    read = v.get(bw, "read_bytes_per_s", _is_pos_int, "a positive integer", p)
    basis = v.get(bw, "basis", lambda x: x in BANDWIDTH_BASES, " or ".join(BANDWIDTH_BASES), p)
    peak = v.get(bw, "theoretical_bytes_per_s", _opt(_is_pos_int), "a positive integer or null", p)
    source = v.get(bw, "source", _is_text, "a non-empty string", p)
    return None if len(v.problems) > before else MemoryBandwidth(read, basis, peak, source)


def _bitsandbytes(v: _Validator, d: dict) -> BitsAndBytesSupport | None:
    bnb = v.get(d, "bitsandbytes", lambda x: isinstance(x, dict), "an object")
    if bnb is None:
        return None
    before = len(v.problems)
    v.unknown_keys(bnb, ("cpu", "cuda"), "bitsandbytes.")
    cpu = v.get(bnb, "cpu", _opt(_is_bool), "true, false or null", "bitsandbytes.")
    cuda = v.get(bnb, "cuda", _opt(_is_bool), "true, false or null", "bitsandbytes.")
    return None if len(v.problems) > before else BitsAndBytesSupport(cpu, cuda)


def _probed(v: _Validator, d: dict) -> ProbeInfo | None:
    probed = v.get(d, "probed", _opt(lambda x: isinstance(x, dict)), "an object or null")
    if probed is None:
        return None
    p = "probed."
    v.unknown_keys(probed, ("at", "host", "available_ram_bytes", "torch", "bitsandbytes_error"), p)
    return ProbeInfo(
        at=v.get(probed, "at", _is_text, "an ISO time string", p),
        host=v.get(probed, "host", _is_str, "a string", p),
        available_ram_bytes=v.get(probed, "available_ram_bytes", _is_nonneg_int, "a non-negative integer", p),
        torch=v.get(probed, "torch", _opt(_is_str), "a string or null", p),
        bitsandbytes_error=v.get(probed, "bitsandbytes_error", _opt(_is_str), "a string or null", p),
    )


# --- loading and saving ------------------------------------------------------------------------


def builtin_names() -> list[str]:
    folder = profiles_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name ("rpi5-8gb"), or a JSON file when the argument ends in
    .json or contains a path separator."""
    text = str(name_or_path)
    if text.endswith(".json") or "/" in text or os.sep in text:
        return _load_file(Path(text))
    path = profiles_dir() / f"{text}.json"
    if _NAME_RE.match(text) and path.is_file():
        return _load_file(path, expected_name=text)
    raise _unknown_profile(text)


def list_profiles() -> list[DeviceProfile]:
    """Every built-in profile, sorted by name; a malformed one raises ProfileError."""
    folder = profiles_dir()
    if not folder.is_dir():
        raise ProfileError(f"no built-in profiles folder at {folder}",
                           "set EDGEPACK_PROFILES_DIR to the folder holding the *.json profiles")
    return [_load_file(folder / f"{n}.json", expected_name=n) for n in builtin_names()]


def save_profile(profile: DeviceProfile, path: str | os.PathLike) -> Path:
    """Write the profile as JSON atomically (temp file + os.replace): a reader never sees
    half a file, even if the box loses power mid-write."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(profile.to_dict(), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ProfileError(f"cannot write profile {path}: {exc.strerror or exc}",
                           "pick a path in an existing, writable directory") from exc
    return path


def _load_file(path: Path, expected_name: str | None = None) -> DeviceProfile:
    origin = path.name if expected_name else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = "`edgepack profile --out FILE` writes one for this machine"
        if path.stem in builtin_names():
            hint = f"for the built-in profile, pass its name without .json: {path.stem}"
        raise ProfileError(f"profile file {path} does not exist", hint) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}", None) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile {origin} is not valid JSON: {exc.msg} at line {exc.lineno} "
                           f"column {exc.colno}", _FIX_HINT) from None
    return DeviceProfile.from_dict(data, origin=origin, expected_name=expected_name)


def _unknown_profile(name: str) -> ProfileError:
    names = builtin_names()
    if not names:
        return ProfileError(f"unknown profile {name!r}: no built-in profiles found in {profiles_dir()}",
                            "set EDGEPACK_PROFILES_DIR, or pass a path to a profile JSON file")
    query = name.lower()
    similar = difflib.get_close_matches(query, names, n=3, cutoff=0.5)
    close = list(dict.fromkeys(similar + [n for n in names if query and query in n]))[:4]  # "jetson"
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return ProfileError(f"unknown profile {name!r}",
                        hint + f"`edgepack profiles` lists all {len(names)} built-in profiles")
