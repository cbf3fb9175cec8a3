"""``edgepack pull``: download a bundle from the Hub and verify it (edgepack.hub.download.pull)."""

from __future__ import annotations

import json
import os
import sys

from edgepack.errors import SignatureError, VariantError, printable


def _say(msg: str) -> None:
    print(f"[edgepack] {printable(msg)}", file=sys.stderr, flush=True)  # msg quotes repo and variant names


def configure_parser(p) -> None:
    p.add_argument("repo", metavar="REPO_ID[@REVISION]", help="owner/name, owner/name@revision or hf://owner/name")
    p.add_argument("-o", "--out", default=None, metavar="DIR", help="write the bundle here (default: edgepack's cache)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--variant", default=None, metavar="NAME", help="the variant folder to pull")
    which.add_argument("--auto", action="store_true", help="profile this box and pull the best variant that fits")
    p.add_argument("--profile", default=None, metavar="NAME|FILE",
                   help="with --auto: choose for this device profile instead of probing this box")
    p.add_argument("--revision", default=None, help="branch, tag or commit (or write REPO_ID@REVISION)")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--key", default=None, metavar="PUBKEY",
                   help="refuse the bundle unless this Ed25519 public key signed it (default: $EDGEPACK_TRUSTED_KEY)")


def main(args) -> int:
    from edgepack.format import bundle as bundle_format
    from edgepack.hub.download import pull

    profile = None
    if args.profile is not None:
        if args.variant is not None:
            raise VariantError("--profile chooses a variant; it cannot be combined with --variant",
                               hint="use --auto --profile NAME, or --variant NAME")
        from edgepack.plan.profile import load_profile

        profile = load_profile(args.profile)
    key = getattr(args, "key", None) or os.environ.get("EDGEPACK_TRUSTED_KEY") or None
    if key is not None:  # a missing or unreadable key file: refused before anything is fetched
        from edgepack.format.signing import load_public_key

        load_public_key(key)
    # with a key, pull() checks the signature over the manifest before fetching any weight
    from edgepack.format.verify import HashProgress

    with HashProgress() as hashing:
        result = pull(args.repo, out=args.out, variant=args.variant, auto=args.auto, revision=args.revision,
                      token=args.token, profile=profile, progress=_say, key=key, hash_progress=hashing)
    from edgepack.format import signing

    if key is not None:  # the files were hashed against this manifest as they were pulled
        try:
            signing.check_bundle_signature(result.path, key)
        except SignatureError as exc:
            raise SignatureError(f"{exc.message}; the files pulled to {result.path} are not to be trusted",
                                 hint=exc.hint) from None
    elif (result.path / bundle_format.SIGNATURE_NAME).exists():
        signing.read_signature(result.path)  # a malformed signature is refused, not ignored
    manifest = bundle_format.read_manifest(result.path)
    total = sum(e["size"] for e in manifest["files"])
    if getattr(args, "json", False):
        print(json.dumps({"path": str(result.path), "repo_id": result.repo_id, "commit": result.commit,
                          "variant": result.variant, "reason": result.reason,
                          "files": len(manifest["files"]), "bytes": total, "signature_checked": key is not None}))
        return 0
    print(f"variant: {printable(result.reason)}", file=sys.stderr)  # names and figures from the remote index
    print(printable(f"ok: {result.repo_id}@{result.commit[:8]}: {len(manifest['files'])} files, {total / 1e6:.1f} MB, "
                    "sizes and sha256 match the manifest"), file=sys.stderr)
    print(printable(result.path))
    return 0
