"""``edgepack sign``: sign a bundle's manifest; verify a signature before trusting a bundle.

    edgepack sign --generate-key mykey.pem          # writes mykey.pem and mykey.pem.pub
    edgepack sign smollm2-8bit --key mykey.pem      # writes smollm2-8bit/edgepack.sig
    edgepack verify smollm2-8bit --key mykey.pem.pub

The signature is Ed25519 over the exact bytes of ``edgepack.json``, which lists every file
of the bundle with its size and sha256. Verifying checks the signature over the manifest
and then the whole bundle with hashes, so any changed, added, missing or renamed file, an
edited manifest, or another key fails. The format of ``edgepack.sig`` is documented in
FORMAT.md ("Signatures"). Needs the ``cryptography`` package (``pip install edgepack[sign]``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgepack.format import bundle as bundle_format
from edgepack.errors import EdgepackError, MissingDependencyError, SignatureError

SIGNATURE_FORMAT = "edgepack-signature"
SIGNATURE_VERSION = 1
ALGORITHM = "ed25519"
# Signed message = this prefix + the manifest's bytes, so that an edgepack key's
# signature can never be passed off as a signature of anything else (domain separation).
MESSAGE_PREFIX = b"edgepack-manifest-v1\n"
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_KEY_BYTES = 64 * 1024


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependencyError(
            "signing needs the cryptography package, which is not installed",
            hint="pip install 'edgepack[sign]'",
        ) from None
    return serialization, ed25519, InvalidSignature


# --- keys --------------------------------------------------------------------------------------


def generate_key(private_path: str | os.PathLike) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair as PEM: the private key to ``private_path`` (mode 0600,
    never overwritten) and the public key beside it with ``.pub`` appended. Returns
    (private path, public path, key id)."""
    serialization, ed25519, _ = _crypto()
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path} already exists", hint="choose another file name; keys are never overwritten")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path, key_id(key.public_key())


def key_id(public_key) -> str:
    """sha256 (hex) of the raw 32-byte Ed25519 public key."""
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _read_key_file(path: str | os.PathLike) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read key {path}: {exc.strerror or exc}", hint="check the --key path") from None
    if len(data) > MAX_KEY_BYTES:
        raise SignatureError(f"{path} is not a PEM key (it is {len(data)} bytes)", hint="check the --key path")
    return data


def load_private_key(path: str | os.PathLike):
    serialization, ed25519, _ = _crypto()
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(
            f"{path} is not an unencrypted PEM private key ({str(exc).splitlines()[0]})",
            hint="make one with `edgepack sign --generate-key KEYFILE`",
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 key", hint="edgepack signs with Ed25519 keys only")
    return key


def load_public_key(path: str | os.PathLike):
    serialization, ed25519, _ = _crypto()
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:  # a private key works too: its public half is what verifies
            return load_private_key(path).public_key()
        except SignatureError:
            raise SignatureError(
                f"{path} is not a PEM public key", hint="pass the .pub file that --generate-key wrote"
            ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key", hint="edgepack signs with Ed25519 keys only")
    return key


# --- signing and verifying ---------------------------------------------------------------------


def sign(bundle_dir: str | os.PathLike, key_path: str | os.PathLike) -> dict[str, Any]:
    """Verify the bundle fully, then sign its manifest; write and return ``edgepack.sig``."""
    bundle = Path(bundle_dir)
    key = load_private_key(key_path)
    manifest_bytes = bundle_format.read_manifest_bytes(bundle)
    bundle_format.verify_bundle(bundle, check_hashes=True, manifest_bytes=manifest_bytes)
    signature = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": base64.b64encode(key.sign(MESSAGE_PREFIX + manifest_bytes)).decode("ascii"),
    }
    bundle_format.write_json_atomic(bundle / bundle_format.SIGNATURE_NAME, signature)
    return signature


def read_signature(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and check the shape of ``edgepack.sig``."""
    path = Path(bundle_dir) / bundle_format.SIGNATURE_NAME
    if not path.exists() and not path.is_symlink():
        raise SignatureError(
            f"bundle {Path(bundle_dir)} is not signed (no {bundle_format.SIGNATURE_NAME})",
            hint="sign it with `edgepack sign BUNDLE --key KEY`, or verify without --key",
        )
    try:
        with bundle_format.open_regular(path) as f:
            raw = f.read(MAX_SIGNATURE_BYTES + 1)
        data = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_SIGNATURE_BYTES else None
    except (OSError, ValueError, RecursionError, EdgepackError):
        data = None
    problems = _signature_problems(data)
    if problems:
        raise SignatureError(
            f"{path} is malformed: " + "; ".join(problems),
            hint="sign the bundle again with `edgepack sign BUNDLE --key KEY`",
        )
    return data


def _signature_problems(data: Any) -> list[str]:
    if not isinstance(data, dict):
        return ["not a JSON object"]
    problems = []
    if data.get("format") != SIGNATURE_FORMAT:
        problems.append(f"format must be {SIGNATURE_FORMAT!r}")
    if data.get("version") != SIGNATURE_VERSION or isinstance(data.get("version"), bool):
        problems.append(f"version {data.get('version')!r} is not one this edgepack reads (reads {SIGNATURE_VERSION})")
    if data.get("algorithm") != ALGORITHM:
        problems.append(f"algorithm must be {ALGORITHM!r}")
    for key in ("key_id", "manifest_sha256"):
        value = data.get(key)
        if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
            problems.append(f"{key} must be 64 lowercase hex digits")
    try:
        if len(base64.b64decode(data.get("signature"), validate=True)) != 64:
            problems.append("signature must be 64 bytes, base64")
    except (TypeError, ValueError):
        problems.append("signature must be 64 bytes, base64")
    return problems


def verify_signature(bundle_dir: str | os.PathLike, public_key_path: str | os.PathLike,
                     progress=None) -> dict[str, Any]:
    """Check ``edgepack.sig`` against the public key and the manifest, then verify the
    whole bundle with hashes against exactly the manifest bytes that were signed. Returns
    the manifest. ``progress``: as verify_bundle's."""
    manifest_bytes = check_bundle_signature(bundle_dir, public_key_path)
    return bundle_format.verify_bundle(bundle_dir, check_hashes=True, manifest_bytes=manifest_bytes, progress=progress)


def check_bundle_signature(bundle_dir: str | os.PathLike, public_key_path: str | os.PathLike) -> bytes:
    """Check ``edgepack.sig`` against the public key and the bundle's manifest, without
    hashing the files (for a bundle whose files were just hashed against that manifest).
    Returns the manifest bytes that were signed."""
    bundle = Path(bundle_dir)
    signature = read_signature(bundle)
    manifest_bytes = bundle_format.read_manifest_bytes(bundle)
    check_manifest_signature(manifest_bytes, signature, public_key_path, f"bundle {bundle}")
    return manifest_bytes


def check_manifest_signature(manifest_bytes: bytes, signature: dict[str, Any],
                             public_key_path: str | os.PathLike, what: str) -> None:
    """That ``signature`` (read_signature's) is the public key's over these manifest bytes:
    enough to refuse a bundle before any of its weights is fetched, since the manifest holds
    every file's sha256. ``what`` names the bundle in messages."""
    _, _, InvalidSignature = _crypto()
    public_key = load_public_key(public_key_path)
    expected_id = key_id(public_key)
    if signature["key_id"] != expected_id:
        raise SignatureError(
            f"{what} was signed by key {signature['key_id'][:16]}..., not by {public_key_path} "
            f"({expected_id[:16]}...)",
            hint="verify with the public key of whoever signed it; do not trust this bundle otherwise",
        )
    try:
        public_key.verify(base64.b64decode(signature["signature"]), MESSAGE_PREFIX + manifest_bytes)
    except InvalidSignature:
        raise SignatureError(
            f"the signature of {what} does not match its {bundle_format.MANIFEST_NAME} "
            "(the manifest was changed after signing, or the signature is forged)",
            hint="do not trust this bundle; pull it again from its publisher",
        ) from None


# --- CLI ---------------------------------------------------------------------------------------


def configure_parser(p) -> None:
    p.add_argument("bundle", nargs="?", default=None, help="bundle directory to sign")
    p.add_argument("--key", default=None, help="Ed25519 private key (PEM) to sign with")
    p.add_argument(
        "--generate-key", metavar="KEYFILE", default=None,
        help="write a new key pair: KEYFILE (private, mode 0600) and KEYFILE.pub (public)",
    )


def main(args) -> int:
    if args.generate_key:
        private_path, public_path, kid = generate_key(args.generate_key)
        if getattr(args, "json", False) and not args.bundle:
            print(json.dumps({"private_key": str(private_path), "public_key": str(public_path), "key_id": kid}))
            return 0
        print(f"wrote {private_path} (private: keep it secret) and {public_path} (public); key id {kid}")
        if not args.bundle:
            return 0
        args.key = args.key or str(private_path)
    if not args.bundle or not args.key:
        raise SignatureError(
            "edgepack sign needs a BUNDLE and --key KEY (or --generate-key KEYFILE)",
            hint="edgepack sign BUNDLE --key mykey.pem; make a key with edgepack sign --generate-key mykey.pem",
        )
    signature = sign(args.bundle, args.key)
    if getattr(args, "json", False):
        print(json.dumps({"bundle": str(args.bundle), "signature": str(Path(args.bundle) / bundle_format.SIGNATURE_NAME),
                          "key_id": signature["key_id"], "manifest_sha256": signature["manifest_sha256"]}))
        return 0
    print(f"signed {args.bundle}: {bundle_format.SIGNATURE_NAME} with key {signature['key_id']}")
    return 0
