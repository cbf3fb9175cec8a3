"""Which optional extra a command needs, and the one-line error when it is not installed.

`pip install edgepack` is the small box: verify, inspect, run and serve bundles on
edgepack's C engine, pull from the Hub, plan and probe profiles (tokenizers, jinja2,
psutil, huggingface-hub). The rest comes in extras (pyproject.toml): ``export`` for
``edgepack pack`` on the workstation, ``torch`` for the torch backend (GPUs, nf4/fp4,
architectures the engine does not run), ``serve``, ``gguf``, ``sign``.

Checks use ``importlib.util.find_spec``: it finds a package without importing it, so a
command that has what it needs pays nothing (``import torch`` alone is ~1 s and ~220 MiB),
and one that lacks it stops before it downloads or writes anything.
"""

from __future__ import annotations

import importlib.util

from edgepack.errors import MissingExtraError

# extra -> the import names it provides, in the order a command imports them
EXTRAS: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "safetensors", "accelerate", "bitsandbytes"),
    "torch": ("torch", "transformers", "accelerate", "bitsandbytes"),
    "serve": ("fastapi", "uvicorn"),
    "gguf": ("gguf",),
    "sign": ("cryptography",),
}

# `edgepack COMMAND` -> the extra it cannot start without. plan is not here: a config.json
# source needs nothing beyond the base install, a GGUF or torch source more (the error
# then comes from the ImportError, through ``for_import_error``).
COMMAND_EXTRAS: dict[str, str] = {"pack": "export", "serve": "serve", "sign": "sign"}

# which extra a command's missing module points at, when several provide it
_PREFERRED: dict[str, str] = {"pack": "export", "plan": "export"}


def missing(extra: str, packages: tuple[str, ...] | None = None) -> str | None:
    """The first package of ``extra`` (or of ``packages``, some of them) that is not
    installed, or None when all are."""
    for name in packages or EXTRAS[extra]:
        if importlib.util.find_spec(name) is None:
            return name
    return None


def require(extra: str, what: str, because: str | None = None, packages: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtraError ("WHAT needs the EXTRA extra") when ``extra`` (or the
    ``packages`` of it that this path imports) is not installed."""
    name = missing(extra, packages)
    if name is not None:
        raise MissingExtraError(what, extra, name, because)


def require_for_command(command: str) -> None:
    """Before ``edgepack COMMAND`` imports its module: the extra it always needs."""
    if command in COMMAND_EXTRAS:
        require(COMMAND_EXTRAS[command], f"edgepack {command}")


def for_import_error(exc: BaseException, command: str | None) -> MissingExtraError | None:
    """The MissingExtraError an ImportError of an extra's package stands for, else None
    (an ImportError of anything else is a broken install or a bug, not a missing extra)."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return None
    top = name.partition(".")[0]
    extras = [extra for extra, names in EXTRAS.items() if top in names]
    if not extras:
        return None
    # the command's own extra where it provides the module, else the smallest that does
    preferred = _PREFERRED.get(command or "")
    extra = preferred if preferred in extras else min(extras, key=lambda e: len(EXTRAS[e]))
    return MissingExtraError(f"edgepack {command}" if command else "this", extra, top)
