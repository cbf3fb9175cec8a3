"""``edgepack verify`` and ``edgepack inspect``: check a bundle, show what is inside.

Both read only the manifest and the safetensors headers (no torch import), so they are
quick on a small box."""

from __future__ import annotations

import json
import sys
import time

from edgepack.format import bundle as bundle_format
from edgepack.errors import printable


def configure_verify_parser(p) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--no-hash", action="store_true", help="check sizes and headers only")
    p.add_argument("--key", default=None, metavar="PUBKEY",
                   help="also check edgepack.sig against this Ed25519 public key (PEM); always hashes")


class HashProgress:
    """``hashing 312 / 1024 MB (30%)`` on stderr, rewritten in place, for bundles of at least
    MIN_BYTES and only when stderr is a terminal (-q sends it to /dev/null: nothing shows);
    cleared when hashing ends."""

    MIN_BYTES = 64 << 20  # smaller bundles hash in well under a second
    INTERVAL_S = 0.2

    def __enter__(self):
        self.shown, self.last = False, 0.0
        return self if sys.stderr.isatty() else None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if total < self.MIN_BYTES or (now - self.last < self.INTERVAL_S and done < total):
            return
        self.last, self.shown = now, True
        sys.stderr.write(f"\rhashing {done / 1e6:.0f} / {total / 1e6:.0f} MB ({done / total:.0%})")
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 40 + "\r")
            sys.stderr.flush()


def main_verify(args) -> int:
    if getattr(args, "key", None):
        from edgepack.format import signing

        with HashProgress() as progress:
            manifest = signing.verify_signature(args.bundle, args.key, progress=progress)
        args.no_hash = False
    else:
        with HashProgress() as progress:
            manifest = bundle_format.verify_bundle(args.bundle, check_hashes=not args.no_hash, progress=progress)
    total = sum(e["size"] for e in manifest["files"])
    what = "sizes" if args.no_hash else "sizes and sha256"
    if getattr(args, "key", None):
        what += " and the signature of edgepack.sig"
    if getattr(args, "json", False):
        print(json.dumps({"ok": True, "bundle": str(args.bundle), "files": len(manifest["files"]), "bytes": total,
                          "hashed": not args.no_hash, "signature_checked": bool(getattr(args, "key", None))}))
        return 0
    print(f"ok: {printable(args.bundle)}: {len(manifest['files'])} files, {total / 1e6:.1f} MB, {what} match the manifest")
    return 0


def configure_inspect_parser(p) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print the manifest (without the tensor table) as JSON")


def main_inspect(args) -> int:
    manifest = bundle_format.read_manifest(args.bundle)
    if args.json:
        print(json.dumps({k: v for k, v in manifest.items() if k != "tensors"}, indent=2))
        return 0
    print(describe(manifest))
    print(backend_line(args.bundle, manifest))
    return 0


def backend_line(bundle_dir, manifest: dict) -> str:
    """Which backend ``edgepack run`` would pick on this box for the bundle's device_map, and
    why not edgepack's CPU engine where it cannot run it (config.json read; no torch import)."""
    from pathlib import Path

    from edgepack.runtime import engine as native
    from edgepack.errors import EdgepackError
    from edgepack.runtime import _read_config

    try:
        config = _read_config(Path(bundle_dir))
    except EdgepackError as exc:
        return f"backend:       unknown ({exc.message})"
    device_map = {k: str(v) if not isinstance(v, int) else f"cuda:{v}" for k, v in manifest["device_map"].items()}
    reason = native.unavailable(config, manifest, device_map)
    if reason is None:
        return "backend:       native (edgepack's CPU engine)"
    return f"backend:       torch; edgepack's CPU engine cannot run it: {reason}"


def _source_bits(src: dict, bits) -> str:
    """", already 4-bit (GGUF Q4_1)" for a quantized GGUF source, by its file name (the
    manifest keeps the name; the type is written in it by convention)."""
    from edgepack.format.ggml import GGUF_BITS, type_in_name

    name = src.get("gguf_file")
    kind = type_in_name(name) if isinstance(name, str) else None
    if kind is None or GGUF_BITS[kind] >= 16:
        return ""
    held = GGUF_BITS[kind]
    more = f"; these {bits} bits hold no more than its {held}" if isinstance(bits, int) and bits > held else ""
    return f", already {held}-bit (GGUF {kind}{more})"


def describe(manifest: dict) -> str:
    """One line per field, every field escaped (a manifest is untrusted input)."""
    arch, quant, mem, src = manifest["architecture"], manifest["quantization"], manifest["memory"], manifest["source"]
    origin = src.get("repo_id") or src.get("alias") or src.get("path")
    lines = [
        f"source:        {origin} ({src.get('kind')}{', commit ' + src['commit'] if src.get('commit') else ''})"
        + _source_bits(src, quant.get("bits")),
        f"architecture:  {arch.get('model_type')}, {arch.get('num_parameters', 0) / 1e6:.1f}M parameters, "
        f"{arch.get('num_hidden_layers')} layers, hidden {arch.get('hidden_size')}, "
        f"{arch.get('num_key_value_heads')} kv heads, vocab {arch.get('vocab_size')}",
        f"quantization:  {quant['bits']}-bit {quant['scheme']}"
        + (f", block {quant['blocksize']}, double quant {quant['double_quant']}" if quant["bits"] == 4 else "")
        + f", compute {quant['compute_dtype']}; {len(quant.get('quantized_modules', []))} layers quantized",
    ]
    smoothing = quant.get("smoothing")
    if isinstance(smoothing, dict):
        cal = smoothing.get("calibration") or {}
        lines.append(f"  smoothed:     alpha {smoothing.get('alpha')}, calibrated on {cal.get('tokens', '?')} tokens of {cal.get('text', '?')}")
    rounding = quant.get("rounding")
    if isinstance(rounding, dict):
        lines.append(f"  rounding:     GPTQ on {rounding.get('calibration_tokens', '?')} calibration tokens (damp {rounding.get('damp', '?')})")
    tables = quant.get("tables")
    if isinstance(tables, dict):
        lines.append(f"  8-bit tables: {', '.join(map(str, tables.get('modules') or []))} ({tables.get('scheme')})")
    for module, reason in quant.get("kept_modules", {}).items():
        lines.append(f"  kept 16-bit:  {module}: {reason}")
    lines.append(f"weights:       {mem['weight_bytes'] / 1e6:.1f} MB  "
                 + ", ".join(f"{d}: {b / 1e6:.1f} MB" for d, b in mem["weight_bytes_per_device"].items()))
    devices: dict[str, int] = {}
    for device in manifest["device_map"].values():
        devices[str(device)] = devices.get(str(device), 0) + 1
    lines.append("device_map:    " + ", ".join(f"{n} blocks on {d}" for d, n in devices.items()))
    if manifest.get("target_profile"):
        lines.append(f"target:        {manifest['target_profile'].get('name')}")
    verification = manifest.get("verification") or {}
    if verification:
        lines.append(
            f"verified:      top-1 agreement with source {verification.get('top1_agreement_vs_source')}, "
            f"mean KL {verification.get('mean_kl_vs_source')}"
        )
    lines.append(f"files:         {len(manifest['files'])}, {sum(e['size'] for e in manifest['files']) / 1e6:.1f} MB")
    lines.append(f"created:       {manifest['created_at']} with edgepack {manifest['versions'].get('edgepack')}")
    return "\n".join(printable(line) for line in lines)
