"""``edgepack verify`` and ``edgepack inspect``: check a bundle, show what is inside.

Both read only the manifest and the safetensors headers (no torch import), so they are
quick on a small box."""

from __future__ import annotations

import json

from edgepack.format import bundle as bundle_format
from edgepack.errors import printable


def configure_verify_parser(p) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--no-hash", action="store_true", help="check sizes and headers only")
    p.add_argument("--key", default=None, metavar="PUBKEY",
                   help="also check edgepack.sig against this Ed25519 public key (PEM); always hashes")


def main_verify(args) -> int:
    if getattr(args, "key", None):
        from edgepack.format import signing

        manifest = signing.verify_signature(args.bundle, args.key)
        args.no_hash = False
    else:
        manifest = bundle_format.verify_bundle(args.bundle, check_hashes=not args.no_hash)
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


def describe(manifest: dict) -> str:
    """One line per field, every field escaped (a manifest is untrusted input)."""
    arch, quant, mem, src = manifest["architecture"], manifest["quantization"], manifest["memory"], manifest["source"]
    origin = src.get("repo_id") or src.get("alias") or src.get("path")
    lines = [
        f"source:        {origin} ({src.get('kind')}{', commit ' + src['commit'] if src.get('commit') else ''})",
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
