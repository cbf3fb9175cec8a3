"""Crafting damaged-but-consistent bundles for the format, reliability and CLI tests:
edit the manifest, reseal a file's size and hash after changing it, rewrite a shard's
header, so a crafted file gets past the cheap checks to the one under test."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from edgepack.format import bundle

def load_manifest(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / bundle.MANIFEST_NAME).read_text())


def save_manifest(bundle_dir: Path, manifest: dict) -> None:
    (bundle_dir / bundle.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def edit_manifest(bundle_dir: Path, edit) -> None:
    manifest = load_manifest(bundle_dir)
    edit(manifest)
    save_manifest(bundle_dir, manifest)


def reseal(bundle_dir: Path, *rels: str) -> None:
    """Make the manifest's size and sha256 of ``rels`` match the files as they are now, so a
    crafted file gets past the size and hash checks to the deeper ones."""
    manifest = load_manifest(bundle_dir)
    for entry in manifest["files"]:
        if entry["path"] in rels:
            data = (bundle_dir / entry["path"]).read_bytes()
            entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    save_manifest(bundle_dir, manifest)


def read_shard(path: Path) -> tuple[dict, bytes]:
    """(header with __metadata__, data section) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_shard(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def craft_shard(bundle_dir: Path, edit, rel: str = "model.safetensors") -> None:
    """Edit a shard's header dict in place, rewrite the shard and reseal it."""
    header, data = read_shard(bundle_dir / rel)
    result = edit(header)
    write_shard(bundle_dir / rel, result if result is not None else header, data)
    reseal(bundle_dir, rel)


# --- manifest schema -------------------------------------------------------------------------
