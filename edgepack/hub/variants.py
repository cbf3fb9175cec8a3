"""The variant index (``edgepack-variants.json``) and the choice of a variant for a box.

A repo holds one bundle at its root, or several variants, one folder per target device
(``pi5-8gb/``, ``t4/``, ...), or both. The index at the repo root lists each bundle's bits,
scheme, target profile, weight bytes and memory need. Everything here is pure: a manifest or
an index in, an entry, a verdict or a choice out; reading one from disk is size-capped first,
since it comes from the Hub (untrusted input).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from edgepack.errors import HubError, VariantError
from edgepack.format import bundle as bundle_format
from edgepack.runtime.constants import NATIVE_OVERHEAD_BYTES, TORCH_OVERHEAD_BYTES

INDEX_NAME = "edgepack-variants.json"
INDEX_FORMAT = "edgepack-variants"
INDEX_VERSION = 1
# An index entry is ~1.5 kB, so 1 MiB holds hundreds of variants; anything larger is
# damage or an attack, refused before it is read into memory and parsed.
MAX_INDEX_BYTES = 1024 * 1024
_VARIANT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
_BACKEND_NAMES = {"native": "edgepack's CPU engine", "torch": "torch"}
_QUALITY_KEYS = ("top1_agreement_vs_source", "mean_kl_vs_source", "prompt_tokens", "tensors_bit_identical")


def check_variant_name(name: str) -> str:
    if not isinstance(name, str) or not _VARIANT_RE.match(name):
        raise VariantError(
            f"variant name {name!r} must be 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            hint="name it after the target device, e.g. --variant pi5-8gb",
        )
    return name



# --- the index ----------------------------------------------------------------------------


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
        # with the torch backend, the most any box needs: the card's figure; fit() counts the
        # backend the variant runs on there
        "memory_need_bytes": weight_bytes + TORCH_OVERHEAD_BYTES,
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


def load_index_json(path: str | os.PathLike, origin: str) -> Any:
    """An index from the Hub: size-capped before it is read, any bytes an HubError."""
    with open(path, "rb") as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise HubError(f"{origin} is more than the {MAX_INDEX_BYTES} bytes an index may be",
                       hint="push a variant again to rewrite the index")
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise HubError(f"{origin} is not valid JSON (nested too deeply)",
                       hint="push a variant again to rewrite the index") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubError(f"{origin} is not valid JSON ({exc})", hint="push the bundle again to rewrite it") from None


def read_remote_manifest(path: str | os.PathLike, repo_id: str, prefix: str = "") -> dict[str, Any]:
    """A manifest from the Hub, with the size cap and strict parse a local bundle's gets."""
    origin = f"{repo_id}/{prefix}{bundle_format.MANIFEST_NAME}"
    with open(path, "rb") as f:
        raw = f.read(bundle_format.MAX_MANIFEST_BYTES + 1)
    if len(raw) > bundle_format.MAX_MANIFEST_BYTES:
        raise bundle_format.ManifestError(f"{origin} is more than the {bundle_format.MAX_MANIFEST_BYTES} bytes "
                                          "a manifest may be", hint="push the bundle again")
    return bundle_format.parse_manifest(raw, origin=origin)


# --- choosing a variant for a box ---------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """Whether one variant fits one box: each memory pool it needs, and what the box has there."""

    entry: dict[str, Any]
    checks: tuple[tuple[str, int, int], ...]  # (pool, bytes needed, bytes usable)
    on_gpu: bool  # its weights would live in GPU memory on this box
    backend: str = "torch"  # what runs it there: "native" (edgepack's C engine) or "torch"

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


def backend_for(entry: dict[str, Any], profile, on_gpu: bool) -> str:
    """The backend the runtime picks for this variant on this box, by its own rule
    (edgepack.runtime.engine.unavailable) read from the index: the C engine runs Llama-family
    models at int8, int4 or 16 bits on an x86-64 CPU with AVX2 or any aarch64 CPU; torch
    runs the rest (nf4/fp4, other architectures, weights on a GPU)."""
    from edgepack.runtime.engine import SUPPORTED_TYPES

    cpu = profile.cpu
    tuned = cpu.arch == "aarch64" or (cpu.arch == "x86_64" and {"avx2", "avx512f"} & set(cpu.simd))
    model_type = (entry.get("architecture") or {}).get("model_type")
    layers = entry["bits"] in (8, 16) or entry.get("scheme") == "int4"
    return "native" if not on_gpu and tuned and model_type in SUPPORTED_TYPES and layers else "torch"


def fit(entry: dict[str, Any], profile) -> Fit:
    """Where a variant's weights would live on this box and whether they fit there.

    The runtime follows the bundle's device_map: weights planned for a GPU go to the GPU when
    the box has one, everything else (and everything, on a box without a GPU) stays in RAM.
    The runtime overhead, the preflight's figure for the backend that will run it (96 MiB for
    the C engine, 400 MiB with torch), is counted in RAM, where the interpreter lives. On a
    unified-memory box (Jetson) RAM and GPU are one pool, counted once.
    """
    weight = entry["weight_bytes"]
    per_device = (entry.get("memory") or {}).get("weight_bytes_per_device") or {"cpu": weight}
    gpu_bytes: dict[int, int] = {}
    for device, nbytes in per_device.items():
        index = _cuda_index(device)
        if index is not None:
            gpu_bytes[index] = gpu_bytes.get(index, 0) + int(nbytes)
    on_gpu = bool(gpu_bytes) and profile.has_gpu
    backend = backend_for(entry, profile, on_gpu)
    overhead = NATIVE_OVERHEAD_BYTES if backend == "native" else TORCH_OVERHEAD_BYTES
    if profile.unified_memory and profile.has_gpu:
        return Fit(entry, (("unified memory", weight + overhead, profile.gpu_usable_bytes(0)),), on_gpu, backend)
    if not on_gpu:
        return Fit(entry, (("RAM", weight + overhead, profile.ram_usable_bytes),), False, backend)
    checks = [("RAM", weight - sum(gpu_bytes.values()) + overhead, profile.ram_usable_bytes)]
    for index, nbytes in sorted(gpu_bytes.items()):
        have = profile.gpu_usable_bytes(index) if index < len(profile.gpus) else 0
        checks.append((f"GPU {index}" if index < len(profile.gpus) else f"GPU {index} (absent)", nbytes, have))
    return Fit(entry, tuple(checks), True, backend)


def choose_variant(entries: list[dict[str, Any]], profile, repo_id: str = "the repo") -> tuple[dict[str, Any], str]:
    """The best variant that fits ``profile``, and why. Pure: sizes in, choice out.

    Best: on a box with a GPU, a variant that runs on it beats one that would run on the CPU;
    then more bits (better quality); then the one packed for this very profile; then the
    smaller need. Raises VariantError with every variant's numbers when none fits.
    """
    from edgepack.hub.modelcard import entry_label

    if not entries:
        raise VariantError(f"{repo_id} lists no variants",
                           hint="push one with `edgepack push BUNDLE REPO_ID --variant NAME`")
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
                                    -f.entry["memory_need_bytes"], entry_label(f.entry)))
    e = best.entry
    reason = (f"{entry_label(e)} ({e['bits']}-bit {e['scheme']}) is the best fit for this box ({profile.name}): "
              f"it needs {best.describe()}, run by {_BACKEND_NAMES[best.backend]}")
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
