"""The ``edgepack`` command.

Each subcommand lives in its own module with ``configure_parser(parser)`` and
``main(args) -> int``; this file imports a module only when its command runs, so
``edgepack --help`` and ``edgepack run`` stay fast on a small box. This is the only
place that turns an exception into ``error:`` / ``hint:`` lines and an exit code: the
library raises ``edgepack.errors`` types (library exceptions mapped where they happen);
anything else is a bug and still gets one line, with the traceback behind ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pack": ("edgepack.export.pack", "quantize a model once and write a verified bundle"),
    "run": ("edgepack.cli.run", "load a bundle and generate (streams to stdout)"),
    "chat": ("edgepack.cli.chat", "talk with a bundle, turn by turn (history kept in the KV cache)"),
    "verify": ("edgepack.format.verify", "check a bundle's files, sizes and hashes"),
    "inspect": ("edgepack.format.verify", "show what is inside a bundle"),
    "plan": ("edgepack.cli.plan", "pick bits and a device_map for a target device"),
    "profile": ("edgepack.cli.profile", "probe this machine and write a device profile"),
    "profiles": ("edgepack.cli.profile", "list the built-in device profiles"),
    "push": ("edgepack.cli.push", "upload a bundle to the Hugging Face Hub"),
    "pull": ("edgepack.cli.pull", "download a bundle from the Hub and verify it"),
    "serve": ("edgepack.serve", "serve a bundle over an OpenAI-compatible HTTP API"),
    "sign": ("edgepack.format.signing", "sign a bundle's manifest"),
}


# commands whose stdout is a status line (silenced by -q); the others print a result there
# (generated text, a pulled bundle's path, a profile) that -q keeps
STATUS_ON_STDOUT = ("verify", "pack", "push", "sign")
# commands that gain --json here (the others define it themselves, or report nothing)
JSON_ADDED = ("verify", "pack", "push", "pull", "sign")


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("edgepack")
    except metadata.PackageNotFoundError:
        from edgepack import __version__

        return __version__


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there
    is none to say (a flag, or None meaning "decided later", which the help explains)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("EDGEPACK_DEBUG", "") not in ("", "0")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one error + hint line) instead of printing its usage
    block and exiting; subparsers inherit the class."""

    def error(self, message: str):
        from edgepack.errors import UsageError

        raise UsageError(message, hint=f"`{self.prog} --help` lists the arguments and options")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, for `edgepack --help` and unknown commands."""
    parser = _Parser(
        prog="edgepack",
        description="Turn a Hugging Face causal LM into a bundle that fits and runs on a small box.",
        epilog="Set EDGEPACK_DEBUG=1 (or pass --debug) to see tracebacks. `edgepack COMMAND --help` for details.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="store_true", help="print edgepack's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def command_parser(name: str):
    """The parser of one command; only the command that runs pays for its module's import."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"edgepack {name}", description=help_text, formatter_class=_DefaultsFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    configure = getattr(module, f"configure_{name}_parser", None) or module.configure_parser
    configure(parser)
    options = parser._option_string_actions
    if "-q" not in options:
        parser.add_argument("-q", "--quiet", action="store_true",
                            help="print nothing but errors" + ("" if name in STATUS_ON_STDOUT else " and the result on stdout"))
    if name in JSON_ADDED and "--json" not in options:
        parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object on stdout")
    run = getattr(module, f"main_{name}", None) or module.main
    return parser, run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_enabled(argv)
    index = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    name = argv[index] if index is not None and argv[index] in COMMANDS else None
    try:
        if name is None and "--version" in argv:
            print(f"edgepack {version()}")
            return 0
        if name is None:
            build_parser().parse_args(argv)  # prints help, or raises UsageError for a bad command
            build_parser().print_help()
            return 2
        from edgepack import extras

        extras.require_for_command(name)  # before its module is imported: that may need the extra
        parser, run = command_parser(name)
        # intermixed: `edgepack run BUNDLE --chat "prompt"` puts a positional after an option
        args = parser.parse_intermixed_args(argv[:index] + argv[index + 1 :])
        if args.quiet:
            with _silenced(name in STATUS_ON_STDOUT and not getattr(args, "json", False)):
                return int(run(args) or 0)
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return _fail(debug, "interrupted", None, 130)
    except BrokenPipeError:
        # the reader left (`edgepack run ... | head`): nothing to say, and nothing more to
        # flush into the closed pipe at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place every failure becomes a line
        message, hint, code = _describe(exc, name)
        return _fail(debug, message, hint, code)


class _silenced:
    """-q: stderr (and, for a status on stdout, stdout) to /dev/null at the descriptor, so
    progress bars of tqdm and huggingface_hub and C-level output go too; restored before
    an error is printed. The libraries' own bars are also turned off by their switches."""

    def __init__(self, stdout: bool):
        self.fds = (1, 2) if stdout else (2,)

    def __enter__(self):
        os.environ.update(TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
                          TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(fd) for fd in self.fds]
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in self.fds:
            os.dup2(null, fd)
        os.close(null)

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip(self.fds, self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        return False


def _describe(exc: Exception, name: str | None) -> tuple[str, str | None, int]:
    """(message, hint, exit code) for any exception that reached the command line."""
    from edgepack.errors import EdgepackError

    command = f"edgepack {name}" if name else "edgepack"
    if isinstance(exc, EdgepackError):
        return exc.message, exc.hint or f"`{command} --help` describes the arguments", exc.exit_code
    from edgepack import extras

    missing_extra = extras.for_import_error(exc, name)  # torch, transformers, ... on a minimal install
    if missing_extra is not None:
        return missing_extra.message, missing_extra.hint, missing_extra.exit_code
    if isinstance(exc, MemoryError):
        return ("out of memory", "free memory, or use a bundle packed at fewer bits (--bits 4)", 1)
    if isinstance(exc, OSError) and exc.filename is not None:  # disk, permissions: not a bug
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}", "check the path and its permissions", 1
    detail = str(exc).splitlines()[0][:300] if str(exc).strip() else ""
    return (f"internal error: {type(exc).__name__}" + (f": {detail}" if detail else ""),
            "internal error, rerun with --debug (or EDGEPACK_DEBUG=1) for the traceback and report it", 1)


def _fail(debug: bool, message: str, hint: str | None, code: int) -> int:
    from edgepack.errors import printable

    if debug:
        import traceback

        traceback.print_exc()
    print(f"error: {printable(message)}", file=sys.stderr)
    if hint:
        print(f"hint: {printable(hint)}", file=sys.stderr)
    return code

