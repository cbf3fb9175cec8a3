"""Hub repo references as the command line and ``edgepack.load`` take them.

``owner/name``, ``owner/name@revision`` and ``hf://owner/name[@revision]``. Standard library
only: the runtime, the server and the CLI read a reference here without importing the Hub code.
"""

from __future__ import annotations

import re

from edgepack.errors import HubError

REPO_REF_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?\Z")


def parse_repo_ref(ref: str) -> tuple[str, str | None]:
    """``owner/name``, ``owner/name@revision`` or ``hf://owner/name[@revision]`` -> (repo_id, revision)."""
    text = ref.removeprefix("hf://").strip("/") if ref.startswith("hf://") else ref
    if not REPO_REF_RE.match(text):
        raise HubError(
            f"{ref!r} is not a Hub repo reference",
            hint="write it as owner/name, owner/name@revision or hf://owner/name",
        )
    repo_id, _, revision = text.partition("@")
    return repo_id, revision or None
