"""Every exception edgepack raises on purpose.

One root, ``EdgepackError``, carrying a ``message`` (what failed, with the numbers) and a
``hint`` (one concrete next step). Each class also inherits the built-in type it really is,
so ``except FileNotFoundError`` keeps working for callers who never heard of edgepack.
Library code raises these; only the CLI turns them into ``error:`` / ``hint:`` lines.
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Root of every error edgepack raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


# --- sources (exporter side) -------------------------------------------------------------


class SourceNotFoundError(EdgepackError, FileNotFoundError):
    """SOURCE is neither a local model directory, a .gguf file, an alias nor a Hub repo."""


class UnsupportedModelError(EdgepackError, ValueError):
    """The source is not a causal LM, or its architecture is not supported."""


class MissingDependencyError(EdgepackError, ImportError):
    """An optional package needed for this input is not installed."""


class MissingExtraError(MissingDependencyError):
    """A command or backend needs an optional extra (edgepack.extras) that is not installed:
    "WHAT needs the EXTRA extra (PACKAGE is not installed)", hint: the pip line."""

    def __init__(self, what: str, extra: str, package: str, because: str | None = None):
        super().__init__(
            f"{what} needs the {extra} extra ({package} is not installed)" + (f"; {because}" if because else ""),
            hint=f"pip install 'edgepack[{extra}]'",
        )
        self.extra = extra
        self.package = package


class QuantizationError(EdgepackError, ValueError):
    """Unsupported bits / quant type, or quantization failed."""


class OutputExistsError(EdgepackError, FileExistsError):
    """The output directory exists and --force was not given."""


class ExportVerificationError(EdgepackError):
    """The bundle just written does not reload to what was quantized in memory."""


class DiskFullError(EdgepackError, OSError):
    """Writing the bundle ran out of disk space."""


# --- bundles (format, shared by exporter and runtime) --------------------------------------


class BundleNotFoundError(EdgepackError, FileNotFoundError):
    """The path is not a directory holding an edgepack.json."""


class ManifestError(EdgepackError, ValueError):
    """edgepack.json is unreadable, malformed, or of a version this edgepack cannot read."""


class BundleIntegrityError(EdgepackError, ValueError):
    """A file is missing, extra, of the wrong size or hash, or its contents disagree with
    the manifest."""


class SignatureError(EdgepackError, ValueError):
    """A signature is missing, malformed, or does not match the bundle or key."""


# --- planning and running ------------------------------------------------------------------


class ProfileError(EdgepackError, ValueError):
    """A device profile is unknown or malformed."""


class PlanError(EdgepackError, ValueError):
    """Nothing fits the target device (the message carries the numbers)."""


class InsufficientMemoryError(EdgepackError, MemoryError):
    """This box lacks the memory the bundle needs; refused before loading."""


class DeviceError(EdgepackError, RuntimeError):
    """The bundle's device_map names a device this box does not have."""


class GenerationError(EdgepackError, ValueError):
    """Bad sampling arguments or prompt."""


class ChatTemplateError(EdgepackError, ValueError):
    """The bundle's chat template does not compile, or fails on these messages."""


# --- Hub --------------------------------------------------------------------------------------


class HubError(EdgepackError, RuntimeError):
    """A Hub operation failed (not found, unauthorized, network)."""


class VariantError(EdgepackError, LookupError):
    """No variant of the repo matches the request or fits this box."""


# --- the command line ----------------------------------------------------------------------------


class UsageError(EdgepackError, ValueError):
    """A command line argparse refuses: unknown command or option, a value of the wrong type."""

    exit_code = 2  # argparse's (and POSIX utilities') code for a usage error


# --- showing untrusted text -------------------------------------------------------------------


def _escape_table() -> dict[int, str]:
    # C0 controls (ESC starts terminal escape sequences, BEL ends OSC titles, CR overwrites
    # a line), DEL, C1 controls (0x9b is a one-byte CSI on some terminals) and the Unicode
    # bidi / line-separator controls that reorder or split what the reader sees.
    codes = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
    named = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
    return {c: named.get(c) or (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in codes}


_ESCAPES = _escape_table()
_ESCAPES_KEEP_LAYOUT = {c: e for c, e in _ESCAPES.items() if c not in (0x09, 0x0A)}


def printable(text: object, newlines: bool = False) -> str:
    """``text`` as it is safe to put on a terminal: every control character written as a
    visible escape (``\\x1b``), so a manifest, config or Hub index cannot retitle the
    terminal, clear it or overwrite a line. ``newlines=True`` keeps plain ``\\n`` and ``\\t``
    for text that is multi-line by design (a report, generated text)."""
    return str(text).translate(_ESCAPES_KEEP_LAYOUT if newlines else _ESCAPES)
