"""``edgepack push`` and ``edgepack pull``: bundles on the Hugging Face Hub.

A repo holds one bundle at its root, or several variants, one folder per target device
(``pi5-8gb/``, ``t4/``, ...), or both. ``edgepack-variants.json`` at the root indexes them:
each variant's bits, scheme, target profile, weight bytes and memory need. Pushing a variant
replaces that folder only, rewrites the index and the model card, all in one commit.

    >>> from edgepack.hub import push, pull
    >>> push("smollm2-4bit", "me/smollm2-edge", variant="pi5-8gb")
    >>> pulled = pull("me/smollm2-edge", auto=True)      # picks what fits this box
    >>> pulled.path, pulled.variant, pulled.reason

    variants.py   the index: its schema, reading it (size-capped), and the pure chooser
    upload.py     push
    download.py   pull, and resolve_bundle_ref (a folder, or a repo pulled for this box)
    failures.py   huggingface_hub's exceptions as HubError with a hint
    modelcard.py  the README.md the Hub shows

huggingface_hub is imported inside the functions that use it: ``import edgepack.hub`` is cheap.
Library functions report through a ``progress`` callback; only edgepack.cli prints.
"""

from edgepack.format.refs import parse_repo_ref
from edgepack.hub.download import DOWNLOAD_ATTEMPTS, PullResult, pull, resolve_bundle_ref
from edgepack.hub.upload import CARD_NAME, PushResult, push
from edgepack.hub.variants import (
    INDEX_NAME,
    MAX_INDEX_BYTES,
    Fit,
    backend_for,
    check_index,
    check_variant_name,
    choose_variant,
    fit,
    index_entries,
    new_index,
    variant_entry,
)

__all__ = [
    "CARD_NAME",
    "DOWNLOAD_ATTEMPTS",
    "INDEX_NAME",
    "MAX_INDEX_BYTES",
    "Fit",
    "PullResult",
    "PushResult",
    "backend_for",
    "check_index",
    "check_variant_name",
    "choose_variant",
    "fit",
    "index_entries",
    "new_index",
    "parse_repo_ref",
    "pull",
    "push",
    "resolve_bundle_ref",
    "variant_entry",
]
