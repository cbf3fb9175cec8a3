"""Every command against every kind of bad input it can meet: a non-zero exit, an ``error:``
line and a ``hint:`` line on stderr, never a traceback. And text from a bundle or the Hub
reaches the terminal with its control characters escaped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from crafting import edit_manifest, reseal

from edgepack.cli import main
from edgepack.errors import printable

HOSTILE = "\x1b]0;pwned\x07\x1b[2J verified OK"
RAW_CONTROLS = ("\x1b", "\x07", "\x9b", "\r", "\x7f")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_error_and_hint(code: int, out: str, err: str, text: str = "") -> None:
    """Progress lines ([edgepack] ..., note: ...) may come first; then exactly error + hint."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("[edgepack] ", "note: "))]
    assert code != 0, (out, err)
    assert "Traceback" not in err + out, err
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), err
    assert text in lines[0], err


# --- the bad inputs ------------------------------------------------------------------------------


def _garbage_manifest(b: Path) -> None:
    (b / "edgepack.json").write_text("{not json")


def _nested_manifest(b: Path) -> None:
    (b / "edgepack.json").write_text("[" * 200_000 + "]" * 200_000)


def _truncated_shard(b: Path) -> None:
    shard = b / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _garbage_tokenizer(b: Path) -> None:
    (b / "tokenizer.json").write_bytes(b"\x00garbage, not a tokenizer")
    reseal(b, "tokenizer.json")


def _nested_tokenizer_config(b: Path) -> None:
    (b / "tokenizer_config.json").write_text("[" * 200_000 + "]" * 200_000)
    reseal(b, "tokenizer_config.json")


def _template(source: str):
    """The bundle's chat template replaced by ``source`` (resealed: it gets past the hashes)."""

    def edit(b: Path) -> None:
        config = json.loads((b / "tokenizer_config.json").read_text())
        assert "chat_template" not in config  # transformers writes it to chat_template.jinja
        (b / "chat_template.jinja").write_text(source)
        reseal(b, "chat_template.jinja")

    return edit


BUNDLE_DAMAGE = {
    "garbage manifest": (_garbage_manifest, "is not valid JSON"),
    "nested manifest": (_nested_manifest, "nested too deeply"),
    "truncated shard": (_truncated_shard, "model.safetensors"),
}
RUN_DAMAGE = {
    "garbage tokenizer.json": (_garbage_tokenizer, [], "tokenizer"),
    "nested tokenizer_config.json": (_nested_tokenizer_config, [], "tokenizer"),
    "template syntax error": (_template("{% for m in messages %}{{ m"), ["--chat"], "chat template"),
    "template raise_exception": (_template("{{ raise_exception('roles must alternate') }}"), ["--chat"],
                                 "roles must alternate"),
    "template undefined call": (_template("{{ messages.nothing_here() }}"), ["--chat"], "chat template"),
    "template unsafe attribute": (_template("{{ messages.__class__.__mro__ }}"), ["--chat"], "chat template"),
    "no template with --chat": (_template(""), ["--chat"], "no chat template"),
}


@pytest.fixture
def paths(tmp_path: Path, tiny_models) -> dict[str, str]:
    """{missing}, {file}, {empty}, {model} (a source model folder) and {tmp}."""
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    return {"missing": str(tmp_path / "nope"), "file": str(tmp_path / "file.txt"), "empty": str(tmp_path / "empty"),
            "model": str(tiny_models["llama"]), "tmp": str(tmp_path)}


# --- every command against missing / file / empty / bad flags ------------------------------------------

PATH_CASES = [
    ("pack", ["pack", "{missing}", "-o", "{tmp}/out"], "source not found"),
    ("pack", ["pack", "{file}", "-o", "{tmp}/out"], "source not found"),
    ("pack", ["pack", "{empty}", "-o", "{tmp}/out"], "without config.json"),
    ("pack", ["pack", "{model}", "-o", "{tmp}/out", "--bits", "eight"], "--bits"),
    ("pack", ["pack", "{model}", "-o", "{tmp}/out", "--bits", "3"], "unsupported bits 3"),
    ("pack", ["pack", "{model}", "-o", "{tmp}/out", "--profile", "no-such-box"], "no-such-box"),
    ("pack", ["pack", "{model}"], "-o/--out"),
    ("run", ["run", "{missing}", "hi"], "bundle not found"),
    ("run", ["run", "{file}", "hi"], "is not a directory"),
    ("run", ["run", "{empty}", "hi"], "not an edgepack bundle"),
    ("verify", ["verify", "{missing}"], "bundle not found"),
    ("verify", ["verify", "{file}"], "is not a directory"),
    ("verify", ["verify", "{empty}"], "not an edgepack bundle"),
    ("verify", ["verify", "{empty}", "--key", "{missing}"], ""),
    ("inspect", ["inspect", "{missing}"], "bundle not found"),
    ("inspect", ["inspect", "{file}"], "is not a directory"),
    ("inspect", ["inspect", "{empty}"], "not an edgepack bundle"),
    ("plan", ["plan", "{missing}", "--profile", "rpi4-4gb"], "source not found"),
    ("plan", ["plan", "{file}", "--profile", "rpi4-4gb"], "source not found"),
    ("plan", ["plan", "{empty}", "--profile", "rpi4-4gb"], "without config.json"),
    ("plan", ["plan", "{model}", "--profile", "{missing}.json"], "does not exist"),
    ("plan", ["plan", "{model}", "--profile", "{file}"], "profile"),
    ("plan", ["plan", "{model}", "--profile", "rpi4-4gb", "--context", "lots"], "--context"),
    ("plan", ["plan", "{model}", "--profile", "rpi4-4gb", "--context", "-5"], "context"),
    ("plan", ["plan", "{model}", "--profile", "rpi4-4gb", "--batch", "0"], "batch"),
    ("plan", ["plan", "{model}", "--profile", "rpi4-4gb", "--bits", "5"], "bits"),
    ("profile", ["profile", "--out", "{missing}/deeper/p.json"], "p.json"),
    ("profile", ["profile", "--out", "{empty}"], "empty"),
    ("pull", ["pull", "not a repo id"], "not a repo id"),
    ("pull", ["pull", "owner/repo", "--variant", "x", "--auto"], "--auto"),
    ("pull", ["pull", "owner/repo", "--variant", "x", "--profile", "rpi4-4gb"], "--profile"),
    ("push", ["push", "{missing}", "owner/repo"], "bundle not found"),
    ("push", ["push", "{empty}", "owner/repo"], "not an edgepack bundle"),
    ("push", ["push", "{file}", "owner/repo"], "is not a directory"),
    ("serve", ["serve", "{missing}"], "not a bundle directory"),
    ("serve", ["serve", "{file}"], "not a bundle directory"),
    ("serve", ["serve", "{empty}"], "not an edgepack bundle"),
    ("serve", ["serve", "{empty}", "--port", "http"], "--port"),
    ("sign", ["sign", "{missing}", "--key", "{file}"], ""),
    ("sign", ["sign", "{empty}", "--key", "{file}"], ""),
    ("unknown command", ["frobnicate"], "frobnicate"),
    ("unknown option", ["verify", "{empty}", "--frob"], "--frob"),
]


@pytest.mark.parametrize("argv,text", [c[1:] for c in PATH_CASES], ids=[f"{c[0]}-{i}" for i, c in enumerate(PATH_CASES)])
def test_bad_paths_and_flags(capsys, paths, argv, text):
    code, out, err = run_cli(capsys, *[a.format(**paths) for a in argv])
    assert_error_and_hint(code, out, err, text)


# --- bundle commands against damaged bundles ------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "verify", "inspect", "serve", "push"])
@pytest.mark.parametrize("damage", BUNDLE_DAMAGE)
def test_damaged_bundle(capsys, bundle_copy, command, damage):
    make, text = BUNDLE_DAMAGE[damage]
    b = bundle_copy("llama", 8)
    make(b)
    if command == "inspect" and damage == "truncated shard":
        pytest.skip("inspect reads the manifest only; the shard is verify's business")
    argv = {"run": ["run", str(b), "hi"], "verify": ["verify", str(b)], "inspect": ["inspect", str(b)],
            "serve": ["serve", str(b)], "push": ["push", str(b), "owner/repo"]}[command]
    code, out, err = run_cli(capsys, *argv)
    assert_error_and_hint(code, out, err, text)


@pytest.mark.parametrize("damage", RUN_DAMAGE)
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_run_tokenizer_and_template_damage(capsys, bundle_copy, damage, backend):
    make, flags, text = RUN_DAMAGE[damage]
    b = bundle_copy("llama", 8)
    make(b)
    code, out, err = run_cli(capsys, "run", str(b), "hi", "--max-new-tokens", "2", "--backend", backend, *flags)
    assert_error_and_hint(code, out, err, text)


def test_serve_with_garbage_tokenizer_fails_at_start_up(capsys, bundle_copy):
    b = bundle_copy("llama", 8)
    _garbage_tokenizer(b)
    code, out, err = run_cli(capsys, "serve", str(b), "--port", "0")
    assert_error_and_hint(code, out, err, "tokenizer")


@pytest.mark.parametrize("flags,text", [
    (["--max-new-tokens", "many"], "--max-new-tokens"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--min-new-tokens", "9", "--max-new-tokens", "2"], "min_new_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "2"], "top_p"),
    (["--top-k", "-3"], "top_k"),
    (["--backend", "gpu"], "--backend"),
    (["--device", "gpu9"], "gpu9"),
    (["--device", "cuda:99"], "cuda:99"),
])
def test_run_bad_flag_values(capsys, packed, flags, text):
    code, out, err = run_cli(capsys, "run", str(packed("llama", 8)), "hi", *flags)
    assert_error_and_hint(code, out, err, text)


def test_run_device_cuda_without_a_gpu(capsys, packed):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this box has a GPU")
    code, out, err = run_cli(capsys, "run", str(packed("llama", 8)), "hi", "--device", "cuda")
    assert_error_and_hint(code, out, err, "cuda")


@pytest.mark.parametrize("bits", ["16", "8", "4"])
def test_pack_an_edgepack_bundle_is_refused(capsys, packed, tmp_path, bits):
    code, out, err = run_cli(capsys, "pack", str(packed("llama", 8)), "-o", str(tmp_path / "again"), "--bits", bits)
    assert_error_and_hint(code, out, err, "already an edgepack bundle")
    assert "pack the original model" in err
    assert not (tmp_path / "again").exists()


def test_plan_an_edgepack_bundle_is_refused(capsys, packed):
    code, out, err = run_cli(capsys, "plan", str(packed("llama", 8)), "--profile", "rpi4-4gb")
    assert_error_and_hint(code, out, err, "already an edgepack bundle")


def test_pack_garbage_config(capsys, tiny_models, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    (src / "config.json").write_text("{nope")
    code, out, err = run_cli(capsys, "pack", str(src), "-o", str(tmp_path / "out"))
    assert_error_and_hint(code, out, err)


def test_sign_with_a_garbage_key(capsys, packed, tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    code, out, err = run_cli(capsys, "sign", str(packed("llama", 8)), "--key", str(key))
    assert_error_and_hint(code, out, err)


def test_pull_offline_of_an_unknown_repo(capsys, tmp_path):
    code, out, err = run_cli(capsys, "pull", "nobody/nothing-here", "-o", str(tmp_path / "p"))
    assert_error_and_hint(code, out, err)


# --- the one place: unexpected exceptions -------------------------------------------------------------


def test_unexpected_exception_is_one_line(capsys, monkeypatch, packed):
    from edgepack.format import verify

    def boom(*_a, **_k):
        raise ZeroDivisionError("division by zero somewhere deep")

    monkeypatch.setattr(verify.bundle_format, "read_manifest", boom)
    code, out, err = run_cli(capsys, "inspect", str(packed("llama", 8)))
    assert_error_and_hint(code, out, err, "internal error")
    assert "ZeroDivisionError" in err and "--debug" in err
    monkeypatch.setenv("EDGEPACK_DEBUG", "1")
    code, out, err = run_cli(capsys, "inspect", str(packed("llama", 8)))
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err


def test_interrupt_and_memory_error(capsys, monkeypatch, packed):
    from edgepack.format import verify

    def oom(*_a, **_k):
        raise MemoryError()

    monkeypatch.setattr(verify.bundle_format, "read_manifest", oom)
    code, out, err = run_cli(capsys, "inspect", str(packed("llama", 8)))
    assert_error_and_hint(code, out, err, "out of memory")


def test_in_a_real_process_no_traceback(bundle_copy):
    """The console entry point end to end: garbage tokenizer, run, real interpreter."""
    b = bundle_copy("llama", 8)
    _garbage_tokenizer(b)
    env = {**os.environ, "EDGEPACK_DEBUG": "0"}
    proc = subprocess.run([sys.executable, "-m", "edgepack.cli", "run", str(b), "hi"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert_error_and_hint(proc.returncode, proc.stdout, proc.stderr, "tokenizer")


# --- terminal escaping (item 10) ------------------------------------------------------------------------


def test_printable_escapes_controls_and_keeps_text():
    assert printable(HOSTILE) == "\\x1b]0;pwned\\x07\\x1b[2J verified OK"
    assert printable("a\rb\x7fc\x9bd\x00e\u202ef") == "a\\rb\\x7fc\\x9bd\\x00e\\u202ef"
    assert printable("naïve café 東京 🚀") == "naïve café 東京 🚀"
    assert printable("two\nlines\ttab") == "two\\nlines\\ttab"
    assert printable("two\nlines", newlines=True) == "two\nlines"


def _hostile_manifest(b: Path) -> None:
    def edit(m: dict) -> None:
        m["source"] = {"kind": HOSTILE, "repo_id": HOSTILE, "commit": HOSTILE}
        m["architecture"]["model_type"] = HOSTILE
        m["quantization"]["kept_modules"] = {HOSTILE: HOSTILE}
        m["target_profile"] = {"name": HOSTILE}
        m["created_at"] = HOSTILE
        m["versions"]["edgepack"] = HOSTILE
        m["verification"] = {"top1_agreement_vs_source": HOSTILE, "mean_kl_vs_source": HOSTILE}

    edit_manifest(b, edit)


def test_inspect_escapes_control_characters(capsys, bundle_copy):
    b = bundle_copy("llama", 8)
    _hostile_manifest(b)
    code, out, err = run_cli(capsys, "inspect", str(b))
    assert code == 0, err
    assert not any(c in out + err for c in RAW_CONTROLS), out
    assert "\\x1b]0;pwned\\x07\\x1b[2J verified OK" in out
    assert out.count("\n") >= 8  # still one field a line
    code, out, _ = run_cli(capsys, "inspect", str(b), "--json")
    assert code == 0 and not any(c in out for c in RAW_CONTROLS)
    assert json.loads(out)["created_at"] == HOSTILE


def test_verify_escapes_the_path_it_prints(capsys, packed, tmp_path):
    import shutil

    b = tmp_path / "b\x1b[2Jx"
    shutil.copytree(packed("llama", 8), b)
    code, out, err = run_cli(capsys, "verify", str(b))
    assert code == 0 and "\x1b" not in out and "b\\x1b[2Jx" in out


def test_error_messages_quoting_untrusted_text_are_escaped(capsys, bundle_copy):
    b = bundle_copy("llama", 8)
    edit_manifest(b, lambda m: m.update(format_version=HOSTILE))
    code, out, err = run_cli(capsys, "verify", str(b))
    assert_error_and_hint(code, out, err)
    assert not any(c in err for c in RAW_CONTROLS), err


def test_run_notices_and_stats_are_escaped(capsys, bundle_copy, monkeypatch):
    from edgepack import runtime

    b = bundle_copy("llama", 8)
    real = runtime._resolve_device_map
    monkeypatch.setattr(runtime, "_resolve_device_map", lambda m, d: (real(m, d)[0], [HOSTILE]))
    code, out, err = run_cli(capsys, "run", str(b), "hi", "--max-new-tokens", "2")
    assert code == 0 and "note: \\x1b]0;pwned" in err and "\x1b" not in err


# --- pull: hostile remote index -------------------------------------------------------------------------

from hub_server import DEFAULT_USER, hub, hub_server  # noqa: E402,F401


def _push_then_replace_index(packed, data: bytes) -> str:
    from huggingface_hub import HfApi

    from edgepack import hub as edgehub

    repo = f"{DEFAULT_USER}/hostile"
    edgehub.push(packed("llama", 8), repo, variant="cpu-8bit")
    HfApi().upload_file(path_or_fileobj=data, path_in_repo=edgehub.INDEX_NAME, repo_id=repo)
    return repo


def test_pull_deeply_nested_remote_index(hub, packed, tmp_path, capsys):
    repo = _push_then_replace_index(packed, b"[" * 200_000 + b"]" * 200_000)
    code, out, err = run_cli(capsys, "pull", repo, "--variant", "cpu-8bit", "-o", str(tmp_path / "p"))
    assert_error_and_hint(code, out, err, "nested too deeply")


def test_pull_escapes_what_the_remote_index_says(hub, packed, tmp_path, capsys, monkeypatch):
    from edgepack import hub as edgehub

    repo = f"{DEFAULT_USER}/hostile"
    edgehub.push(packed("llama", 8), repo, variant="cpu-8bit")
    from huggingface_hub import HfApi, hf_hub_download

    index = json.loads(Path(hf_hub_download(repo, edgehub.INDEX_NAME)).read_text())
    index["variants"][0]["scheme"] = HOSTILE
    index["variants"][0]["target_profile"] = HOSTILE
    HfApi().upload_file(path_or_fileobj=json.dumps(index).encode(), path_in_repo=edgehub.INDEX_NAME, repo_id=repo)
    code, out, err = run_cli(capsys, "pull", repo, "--auto", "--profile", "cpu-laptop-8gb", "-o", str(tmp_path / "p"))
    assert not any(c in out + err for c in RAW_CONTROLS), err
    assert "Traceback" not in err
    if code == 0:  # the index's words are shown, escaped
        assert "\\x1b]0;pwned" in err
    else:  # or refused for disagreeing with the manifest, quoting it escaped
        assert_error_and_hint(code, out, err)


@pytest.mark.parametrize("tty", [True, False])
def test_run_escapes_generated_text_on_a_terminal_only(capsys, packed, monkeypatch, tty):
    from types import SimpleNamespace

    from edgepack import runtime

    pieces = ["line one\n", HOSTILE, "\tend"]
    monkeypatch.setattr(runtime.EdgeModel, "stream_steps", lambda self, *a, **k: (SimpleNamespace(text=t) for t in pieces))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    code, out, _ = run_cli(capsys, "run", str(packed("llama", 8)), "hi")
    assert code == 0
    assert out == ("line one\n" + printable(HOSTILE) + "\tend\n" if tty else "".join(pieces) + "\n")
