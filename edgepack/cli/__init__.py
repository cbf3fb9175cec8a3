"""The ``edgepack`` command.

Each subcommand lives in its own module with ``configure_parser(parser)`` and
``main(args) -> int``; this file imports a module only when its command runs, so
``edgepack --help`` and ``edgepack run`` stay fast on a small box. This is the only
place that turns an ``EdgepackError`` into ``error:`` / ``hint:`` lines and an exit code.
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
    "verify": ("edgepack.format.verify", "check a bundle's files, sizes and hashes"),
    "inspect": ("edgepack.format.verify", "show what is inside a bundle"),
    "plan": ("edgepack.cli.plan", "pick bits and a device_map for a target device"),
    "profile": ("edgepack.plan.profile", "probe this machine and write a device profile"),
    "profiles": ("edgepack.plan.profile", "list the built-in device profiles"),
    "push": ("edgepack.hub", "upload a bundle to the Hugging Face Hub"),
    "pull": ("edgepack.hub", "download a bundle from the Hub and verify it"),
    "serve": ("edgepack.serve", "serve a bundle over an OpenAI-compatible HTTP API"),
    "sign": ("edgepack.format.signing", "sign a bundle's manifest"),
}


def _debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("EDGEPACK_DEBUG", "") not in ("", "0")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, for `edgepack --help` and unknown commands."""
    parser = argparse.ArgumentParser(
        prog="edgepack",
        description="Turn a Hugging Face causal LM into a bundle that fits and runs on a small box.",
        epilog="Set EDGEPACK_DEBUG=1 (or pass --debug) to see tracebacks. `edgepack COMMAND --help` for details.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def command_parser(name: str):
    """The parser of one command; only the command that runs pays for its module's import."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"edgepack {name}", description=help_text)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    configure = getattr(module, f"configure_{name}_parser", None) or module.configure_parser
    configure(parser)
    run = getattr(module, f"main_{name}", None) or module.main
    return parser, run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_enabled(argv)
    index = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    from edgepack.errors import EdgepackError

    try:
        if index is None or argv[index] not in COMMANDS:
            build_parser().parse_args(argv)  # prints help or the "invalid choice" error
            build_parser().print_help()
            return 2
        parser, run = command_parser(argv[index])
        # intermixed: `edgepack run BUNDLE --chat "prompt"` puts a positional after an option
        args = parser.parse_intermixed_args(argv[:index] + argv[index + 1 :])
        return int(run(args) or 0)
    except EdgepackError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1

