"""What a bundle or model argument names: a local folder, or a Hub repo.

The command line, the server, ``edgepack.load`` and the Hub code all take the same spellings:

    ./smollm2-8bit, /srv/b, ~/b, b     a local folder (``b`` when it exists, or is no repo id)
    owner/name, owner/name@revision   a Hub repo, unless a local path of that name exists
    hf://owner/name[@revision]        always a Hub repo

    >>> bundle_ref("me/smollm2-edge@v2")
    RepoRef(repo_id='me/smollm2-edge', revision='v2')

Standard library only, and no network: this decides what to do; pulling is
edgepack.hub.download's. The runtime and the server classify a reference here without
importing the Hub code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import HubError

HF_SCHEME = "hf://"
REPO_REF_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?\Z")
# A model source may also be a bare Hub name (gpt2, distilgpt2): the Hub's canonical models.
_MODEL_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?\Z")
_LOCAL_PREFIXES = (".", "/", "~")


@dataclass(frozen=True)
class RepoRef:
    repo_id: str  # owner/name
    revision: str | None = None  # branch, tag or commit; None: main

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_repo_ref(ref: str) -> tuple[str, str | None]:
    """``owner/name``, ``owner/name@revision`` or ``hf://owner/name[@revision]`` -> (repo_id, revision)."""
    text = ref.removeprefix(HF_SCHEME).strip("/") if ref.startswith(HF_SCHEME) else ref
    if not REPO_REF_RE.match(text):
        raise HubError(
            f"{ref!r} is not a Hub repo reference",
            hint="write it as owner/name, owner/name@revision or hf://owner/name",
        )
    repo_id, _, revision = text.partition("@")
    return repo_id, revision or None


def is_local_path(text: str) -> bool:
    """Written as a path (./, /, ~) or naming something that exists here."""
    return text.startswith(_LOCAL_PREFIXES) or Path(text).expanduser().exists()


def bundle_ref(ref: str | os.PathLike) -> Path | RepoRef:
    """A local folder (a Path, not checked further: the loader says what is wrong with it)
    or a Hub repo (a RepoRef). A path object is always local; ``hf://`` always the Hub, a
    malformed one a HubError; ``owner/name[@revision]`` the Hub unless that path exists."""
    if not isinstance(ref, str):
        return Path(ref)
    if ref.startswith(HF_SCHEME):
        return RepoRef(*parse_repo_ref(ref))
    if is_local_path(ref) or not REPO_REF_RE.match(ref):
        return Path(ref).expanduser()
    return RepoRef(*parse_repo_ref(ref))


def is_model_id(text: str) -> bool:
    """A Hub model id as ``edgepack pack`` and ``edgepack plan`` take it: owner/name or a bare name."""
    return _MODEL_ID_RE.match(text) is not None
