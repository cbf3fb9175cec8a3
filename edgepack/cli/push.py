"""``edgepack push``: upload a bundle to the Hugging Face Hub (edgepack.hub.upload.push)."""

from __future__ import annotations

import json
import sys

from edgepack.errors import printable


def _say(msg: str) -> None:
    print(f"[edgepack] {printable(msg)}", file=sys.stderr, flush=True)  # msg quotes repo and variant names


def configure_parser(p) -> None:
    p.add_argument("bundle", help="bundle directory (written by `edgepack pack`)")
    p.add_argument("repo_id", help="Hub repo, owner/name (created if needed)")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="branch to push to (created from main if new)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="push into folder NAME/ (e.g. pi5-8gb), replacing only that variant")
    p.add_argument("--commit-message", default=None, metavar="MSG",
                   help="the Hub commit's message (default: one naming the bundle and its variant)")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")


def main(args) -> int:
    from edgepack.hub.upload import push

    result = push(args.bundle, args.repo_id, private=args.private, revision=args.revision, variant=args.variant,
                  commit_message=args.commit_message, token=args.token, progress=_say)
    where = f"variant {result.variant} ({result.variant}/)" if result.variant else "the repo root"
    deleted = f", {result.files_deleted} old files removed" if result.files_deleted else ""
    if getattr(args, "json", False):
        print(json.dumps({"bundle": str(args.bundle), "repo_id": result.repo_id, "revision": result.revision,
                          "variant": result.variant, "files_uploaded": result.files_uploaded,
                          "files_deleted": result.files_deleted, "commit_url": result.commit_url}))
        return 0
    print(printable(f"pushed {args.bundle} to {result.repo_id}@{result.revision}, {where}: "
                    f"{result.files_uploaded} files{deleted}, index and model card updated"))
    print(printable(result.commit_url))
    return 0
