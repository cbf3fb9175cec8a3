"""Missing extras: the base install (no torch) runs bundles on the engine, and each command
or backend whose packages are missing says, in one line, which extra to install. Packages
are hidden here by putting None in sys.modules (import then fails, find_spec finds nothing);
tests/test_minimal_install.py does the same with a real minimal install (slow tier)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import edgepack
from edgepack import extras
from edgepack.cli import main
from edgepack.errors import MissingDependencyError, MissingExtraError

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "bitsandbytes", "accelerate", "safetensors", "numpy", "gguf")


def hide(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower()


def test_pyproject_extras_match_what_the_guards_check():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {requirement_name(r) for r in project["dependencies"]}
    assert base == {"huggingface-hub", "psutil", "tokenizers", "jinja2"}
    optional = project["optional-dependencies"]
    for extra, packages in extras.EXTRAS.items():
        assert {requirement_name(r) for r in optional[extra]} == set(packages), extra
    assert "edgepack[export,gguf,serve,sign]" in optional["test"]


def test_pack_without_the_export_extra_is_one_line_and_touches_nothing(monkeypatch, capsys, tmp_path):
    hide(monkeypatch, "torch")
    code = main(["pack", "someone/some-model", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == ["error: edgepack pack needs the export extra (torch is not installed)",
                                "hint: pip install 'edgepack[export]'"]
    assert not (tmp_path / "out").exists()


def test_pack_api_names_the_extra_before_resolving_the_source(monkeypatch, tmp_path):
    from edgepack.export.pack import pack

    hide(monkeypatch, "accelerate")
    with pytest.raises(MissingExtraError) as caught:
        pack("no/such-repo", tmp_path / "out")  # would be a Hub error if the source came first
    assert caught.value.extra == "export" and caught.value.package == "accelerate"
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, MissingDependencyError)


def test_serve_without_the_serve_extra(monkeypatch, capsys, packed):
    bundle = packed("llama", 8)
    hide(monkeypatch, "uvicorn")
    assert main(["serve", str(bundle)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: edgepack serve needs the serve extra (uvicorn is not installed)",
        "hint: pip install 'edgepack[serve]'",
    ]


def test_a_bundle_the_engine_cannot_run_names_the_torch_extra(monkeypatch, packed):
    nf4, int8 = packed("llama", 4), packed("llama", 8)
    hide(monkeypatch, "torch")
    with pytest.raises(MissingExtraError) as caught:
        edgepack.load(nf4)
    assert caught.value.extra == "torch" and caught.value.hint == "pip install 'edgepack[torch]'"
    assert "nf4 layers" in caught.value.message
    with pytest.raises(MissingExtraError, match="backend .torch. asked for"):
        edgepack.load(int8, backend="torch")


def test_a_bundle_without_tokenizer_json_names_the_torch_extra(monkeypatch, bundle_copy):
    from edgepack.runtime.tokenizer import load_tokenizer

    bundle = bundle_copy("llama", 8)
    (bundle / "tokenizer.json").unlink()
    hide(monkeypatch, "transformers")
    with pytest.raises(MissingExtraError, match="no tokenizer.json") as caught:
        load_tokenizer(bundle)
    assert caught.value.package == "transformers"


@pytest.mark.parametrize(
    "module, command, extra",
    [("torch", "pack", "export"), ("torch", "plan", "export"), ("transformers.models", "run", "torch"),
     ("safetensors", "run", "export"), ("fastapi", "serve", "serve"), ("gguf", "plan", "gguf"),
     ("cryptography.hazmat", None, "sign")],
)
def test_an_import_error_of_an_extra_names_it(module, command, extra):
    found = extras.for_import_error(ModuleNotFoundError(f"No module named {module!r}", name=module), command)
    assert found is not None and found.extra == extra and found.package == module.partition(".")[0]
    assert found.message.startswith(f"edgepack {command} needs" if command else "this needs")


@pytest.mark.parametrize("exc", [ModuleNotFoundError("x", name="numpy"), ImportError("cannot import name 'x'"),
                                 ValueError("torch")])
def test_other_errors_are_not_a_missing_extra(exc):
    assert extras.for_import_error(exc, "run") is None


def test_cli_maps_an_import_error_deep_in_a_command(monkeypatch, capsys, packed):
    """A command with no up-front check (run) that hits a missing package still ends in the
    extra's line, not an internal error."""
    bundle = packed("llama", 8)

    def load(*_args, **_kwargs):
        import transformers  # noqa: F401 - hidden: raises ModuleNotFoundError

    monkeypatch.setattr("edgepack.runtime.load", load)
    hide(monkeypatch, "transformers")
    assert main(["run", str(bundle), "hi"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: edgepack run needs the torch extra (transformers is not installed)",
        "hint: pip install 'edgepack[torch]'",
    ]


def test_the_box_commands_import_nothing_heavy(packed, tmp_path):
    """verify, inspect, run (8-bit, int4, 16-bit on the engine) and profile in a process
    where every package of the export/torch extras (and numpy) fails to import."""
    bundles = [packed("llama", 8), packed("llama", 4, quant_type="int4"), packed("llama", 16)]
    script = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({HEAVY!r}))\n"
        "from edgepack.cli import main\n"
        "for argv in ARGVS:\n"
        "    code = main(argv)\n"
        "    if code:\n"
        "        sys.exit(f'{argv}: exit {code}')\n"
        f"print('imported:', sorted(m for m in {HEAVY!r} if sys.modules.get(m) is not None))\n"
    )
    argvs = [["profile", "--out", str(tmp_path / "box.json")]]
    for bundle in bundles:
        argvs += [["verify", str(bundle)], ["inspect", str(bundle)],
                  ["run", str(bundle), "Hello", "--max-new-tokens", "4", "--stats"]]
    done = subprocess.run([sys.executable, "-c", f"ARGVS = {json.dumps(argvs)}\n" + script],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("imported: []")
    assert done.stderr.count("native backend") == 3
