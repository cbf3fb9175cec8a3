"""Daily-use flags: --version, --json, --stats, -q, contradictory options, help defaults, a
busy port found before loading; edgepack.load taking the CLI's references and a --key."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import DEFAULT_USER, hub, hub_server  # noqa: F401

import edgepack
from edgepack import cli
from edgepack import hub as edgehub
from edgepack.errors import SignatureError
from edgepack.format import signing

REPO = Path(__file__).resolve().parents[2]


def edgepack_cmd(*argv: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack.cli", *argv], input=stdin, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})), timeout=300)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    private, public, _ = signing.generate_key(root / "good.pem")
    other_private, other_public, _ = signing.generate_key(root / "other.pem")
    return {"private": private, "public": public, "other_private": other_private, "other_public": other_public}


@pytest.fixture
def signed(bundle_copy, keys):
    bundle = bundle_copy("llama", 8)
    signing.sign(bundle, keys["private"])
    return bundle


# --- --version, help, contradictions ---------------------------------------------------------------


def test_version_comes_from_the_package_metadata(capsys):
    from importlib import metadata

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"edgepack {metadata.version('edgepack')}\n"


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_has_help_and_its_default(name):
    parser, _ = cli.command_parser(name)
    for action in parser._actions:
        assert action.help, f"edgepack {name} {action.option_strings or action.dest} has no help"
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            shown = {str(action.default)} | ({f"{action.default:,}"} if isinstance(action.default, int) else set())
            assert any(s in text for s in shown), f"edgepack {name} {action.option_strings[0]}: default not shown"


def test_serve_help_shows_its_defaults():
    parser, _ = cli.command_parser("serve")
    text = " ".join(parser.format_help().split())
    assert "(default: 8000)" in text and "(default: 127.0.0.1)" in text and "(default: info)" in text


@pytest.mark.parametrize("argv,message", [
    (["--quant-type", "int4", "--bits", "8"], "error: --quant-type applies to 4-bit packing only, not --bits 8"),
    (["--quant-type", "int4"], "error: --quant-type applies to 4-bit packing, and --bits defaults to 8"),
    (["--double-quant", "--bits", "16"], "error: --double-quant applies to 4-bit packing only, not --bits 16"),
    (["--bits", "4", "--no-gptq"], "error: --no-gptq applies to 8-bit packing only, not --bits 4"),
])
def test_pack_refuses_contradictory_options_before_writing(tiny_models, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli.main(["pack", str(tiny_models["llama"]), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == message and err[1].startswith("hint: ") and len(err) == 2
    assert not out.exists()


def test_run_refuses_stats_with_quiet(packed, capsys):
    assert cli.main(["run", str(packed("llama", 8)), "hi", "--stats", "-q"]) == 2
    assert capsys.readouterr().err.startswith("error: --stats prints to stderr, which -q silences\nhint: ")


# --- --json, --stats, -q --------------------------------------------------------------------------


def test_verify_json_and_quiet(packed, tmp_path):
    bundle = packed("llama", 8)
    proc = edgepack_cmd("verify", str(bundle), "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"] is True and report["hashed"] is True
    assert report["files"] == len(edgepack.format.bundle.read_manifest(bundle)["files"])
    quiet = edgepack_cmd("verify", str(bundle), "-q")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    missing = edgepack_cmd("verify", str(tmp_path / "nope"), "-q")  # errors still speak
    assert missing.returncode != 0 and missing.stdout == "" and missing.stderr.startswith("error: bundle not found")


def test_run_json_and_stats_agree_with_generate(packed):
    bundle = packed("llama", 8)
    expected = edgepack.load(bundle).generate("The capital", max_new_tokens=8, temperature=0)
    proc = edgepack_cmd("run", str(bundle), "The capital", "--max-new-tokens", "8", "--temperature", "0", "--json")
    report = json.loads(proc.stdout)
    assert report["text"] == expected and report["generated_tokens"] == 8 and report["finish_reason"] == "length"
    assert report["load_seconds"] > 0 and report["decode_tokens_per_second"] > 0 and report["prompt_tokens_per_second"] > 0
    assert 10 * 2**20 < report["peak_rss_bytes"] < 200 * 2**20  # the C engine: no torch in the process
    stats = edgepack_cmd("run", str(bundle), "The capital", "--max-new-tokens", "8", "--temperature", "0", "--stats")
    assert stats.stdout == expected + "\n"
    assert stats.stderr.startswith("load ") and " tokens/s); generated: 8 tokens, " in stats.stderr
    assert "peak RSS " in stats.stderr and " MiB (native backend, " in stats.stderr


def test_pack_quiet_prints_nothing_and_json_one_object(tiny_models, tmp_path):
    quiet = edgepack_cmd("pack", str(tiny_models["llama"]), "-o", str(tmp_path / "q"), "--bits", "8", "-q")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")  # no progress bar either
    proc = edgepack_cmd("pack", str(tiny_models["llama"]), "-o", str(tmp_path / "j"), "--bits", "8", "--json", "-q")
    report = json.loads(proc.stdout)
    assert report["bits"] == 8 and report["bundle"] == str(tmp_path / "j") and 0 < report["top1_agreement_vs_source"] <= 1


def test_sign_json(bundle_copy, keys):
    bundle = bundle_copy("llama", 8)
    proc = edgepack_cmd("sign", str(bundle), "--key", str(keys["private"]), "--json")
    report = json.loads(proc.stdout)
    assert report["key_id"] == json.loads((bundle / "edgepack.sig").read_text())["key_id"]


# --- serve's port -----------------------------------------------------------------------------------


def test_serve_finds_a_busy_port_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # no bundle at all: the port is checked first, so that is the error
        proc = edgepack_cmd("serve", str(tmp_path / "no-bundle"), "--port", str(port))
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[0] == f"error: port {port} on 127.0.0.1 is already in use"


# --- edgepack.load: references and keys ------------------------------------------------------------


def test_load_takes_repo_references_through_the_hub_code(packed, monkeypatch):
    bundle = packed("llama", 8)
    asked = []

    def resolve(ref, token=None, progress=None):
        asked.append(ref)
        return bundle

    monkeypatch.setattr(edgehub, "resolve_bundle_ref", resolve)
    for ref in ("owner/name", "owner/name@v1", "hf://owner/name@main"):
        assert edgepack.load(ref).path == bundle
    assert asked == ["owner/name", "owner/name@v1", "hf://owner/name@main"]
    assert edgepack.load(str(bundle)).path == bundle and len(asked) == 3  # a folder is no repo


def test_load_pulls_from_the_hub(hub, packed, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    edgehub.push(packed("llama", 8), f"{DEFAULT_USER}/tiny-daily")
    lm = edgepack.load(f"{DEFAULT_USER}/tiny-daily")
    assert lm.generate("The capital", max_new_tokens=6, temperature=0) == edgepack.load(packed("llama", 8)).generate(
        "The capital", max_new_tokens=6, temperature=0)
    assert str(lm.path).startswith(str(tmp_path / "cache"))


def test_loading_a_folder_imports_no_hub_code(packed):
    code = (f"import sys, edgepack; edgepack.load({str(packed('llama', 8))!r}); "
            "print(sorted(m for m in sys.modules if m.startswith(('edgepack.hub', 'edgepack.cli', 'huggingface_hub'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "[]"


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails the test if a bundle's weights start to load."""
    from edgepack.runtime.engine import NativeLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(NativeLM, "load", refuse)


def test_load_with_the_signer_key(signed, keys):
    lm = edgepack.load(signed, key=keys["public"])
    assert lm.generate("The capital", max_new_tokens=4, temperature=0)


@pytest.mark.parametrize("case", ["unsigned", "other-key", "garbage-sig", "edited-file"])
def test_load_with_a_key_refuses_before_reading_weights(case, signed, keys, no_weights_read, monkeypatch):
    key = keys["other_public"] if case == "other-key" else keys["public"]
    if case == "unsigned":
        (signed / "edgepack.sig").unlink()
    if case == "garbage-sig":
        (signed / "edgepack.sig").write_text("not a signature")
    if case == "edited-file":
        config = signed / "config.json"
        config.write_text(config.read_text() + " ")  # one byte more than the signed manifest lists
    with pytest.raises(SignatureError if case != "edited-file" else edgepack.errors.EdgepackError):
        edgepack.load(signed, key=key)
    monkeypatch.setenv("EDGEPACK_TRUSTED_KEY", str(key))  # the environment's key is the same demand
    with pytest.raises(edgepack.errors.EdgepackError):
        edgepack.load(signed)


def test_a_garbage_signature_is_refused_without_a_key(signed, no_weights_read):
    (signed / "edgepack.sig").write_text('{"format": "edgepack-signature"}')
    with pytest.raises(SignatureError, match="malformed"):
        edgepack.load(signed)


@pytest.mark.parametrize("command", ["run", "chat"])
def test_cli_key_refuses_an_unsigned_bundle(command, bundle_copy, keys):
    bundle = bundle_copy("llama", 8)
    argv = [command, str(bundle), "--key", str(keys["public"])] + (["hi"] if command == "run" else [])
    proc = edgepack_cmd(*argv, stdin="hi\n")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: bundle {bundle} is not signed (no edgepack.sig)")


def test_serve_key_refuses_an_unsigned_bundle(bundle_copy, keys):
    pytest.importorskip("uvicorn")
    bundle = bundle_copy("llama", 8)
    proc = edgepack_cmd("serve", str(bundle), "--key", str(keys["public"]), "--port", "0")
    assert proc.returncode != 0 and "is not signed" in proc.stderr.splitlines()[0]


def test_pull_key(hub, signed, bundle_copy, keys, tmp_path, capsys):
    edgehub.push(signed, f"{DEFAULT_USER}/signed")
    assert cli.main(["pull", f"{DEFAULT_USER}/signed", "-o", str(tmp_path / "a"), "--key", str(keys["public"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signature_checked"] is True
    assert cli.main(["pull", f"{DEFAULT_USER}/signed", "-o", str(tmp_path / "b"), "--key", str(keys["other_public"])]) != 0
    assert "was signed by key" in capsys.readouterr().err
    unsigned = bundle_copy("llama", 16)
    edgehub.push(unsigned, f"{DEFAULT_USER}/unsigned")
    assert cli.main(["pull", f"{DEFAULT_USER}/unsigned", "-o", str(tmp_path / "c"), "--key", str(keys["public"])]) != 0
    assert "is not signed" in capsys.readouterr().err
