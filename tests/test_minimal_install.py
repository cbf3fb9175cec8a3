"""Slow tier: `pip install edgepack` with no extras is the small box. A fresh virtual
environment gets this checkout and its real base dependencies from the package index (pip
must not pull torch); bundles packed here (the full install) then verify, run and stream on
the engine there, a bundle is pulled from the (fake) Hub, the box is profiled, and `pack`
names the extra it lacks. Select with `pytest -m slow`; CI runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import DEFAULT_TOKEN, DEFAULT_USER, hub, hub_env, hub_server  # noqa: F401

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# what the base install must not hold: the export and torch extras and what they pull
HEAVY = ("torch", "transformers", "bitsandbytes", "accelerate", "safetensors", "numpy", "sympy")
# measured 76 MB for the whole venv, pip and setuptools included (the full .venv: 1.5 GB);
# torch alone would be 750 MB
MAX_VENV_BYTES = 150_000_000
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> Path:
    """A fresh venv with `pip install <this checkout>` (no extras); returns its bin/."""
    root = tmp_path_factory.mktemp("minimal")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("edgepack", "profiles"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    bin_dir = root / "venv" / "bin"
    done = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(src)],
        capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return bin_dir


def box_env(**extra: str) -> dict[str, str]:
    """The test's environment without this checkout on the path: the box runs what pip installed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def on_box(bin_dir: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=600, env=env or box_env(), cwd=bin_dir.parent)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def test_the_base_install_has_no_torch(box):
    listed = json.loads(on_box(box, "python", "-m", "pip", "list", "--format", "json").stdout)
    names = {p["name"].lower().replace("_", "-") for p in listed}
    assert "edgepack" in names and "tokenizers" in names and "huggingface-hub" in names
    assert names.isdisjoint(HEAVY), sorted(names & set(HEAVY))
    done = on_box(box, "python", "-c", "import torch")
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    # the C engine was compiled at install time, so Llama-family bundles run on it
    done = on_box(box, "python", "-c", "import edgepack.runtime.engine._engine")
    assert done.returncode == 0, done.stderr
    assert tree_bytes(box.parent) < MAX_VENV_BYTES


@pytest.mark.parametrize("bits, options", [(8, {}), (4, {"quant_type": "int4"}), (16, {})])
def test_bundles_packed_elsewhere_verify_run_and_stream(box, packed, bits, options):
    import edgepack

    bundle = packed("llama", bits, **options)
    lm = edgepack.load(bundle)
    assert lm.backend == "native"
    expected = list(lm.stream(PROMPT, max_new_tokens=12, temperature=0))

    done = on_box(box, "edgepack", "verify", str(bundle))
    assert done.returncode == 0 and done.stdout.startswith("ok: "), done.stderr
    done = on_box(box, "edgepack", "inspect", str(bundle), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["quantization"]["bits"] == bits, done.stderr
    done = on_box(box, "edgepack", "run", str(bundle), PROMPT, "--max-new-tokens", "12", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(expected) + "\n"
    script = (
        "import json, sys, edgepack\n"
        f"lm = edgepack.load({str(bundle)!r})\n"
        f"pieces = list(lm.stream({PROMPT!r}, max_new_tokens=12, temperature=0))\n"
        "print(json.dumps({'backend': lm.backend, 'pieces': pieces, 'torch': 'torch' in sys.modules}))\n"
    )
    done = on_box(box, "python", "-c", script)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"backend": "native", "pieces": expected, "torch": False}


def assert_extra_error(done: subprocess.CompletedProcess, first_line: str, extra: str) -> None:
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error: {first_line}", f"hint: pip install 'edgepack[{extra}]'"]


def test_pack_names_the_export_extra(box, tmp_path):
    out = tmp_path / "out"
    done = on_box(box, "edgepack", "pack", "smollm2-135m", "-o", str(out), "--bits", "8")
    assert_extra_error(done, "edgepack pack needs the export extra (torch is not installed)", "export")
    assert not out.exists()


def test_an_nf4_bundle_names_the_torch_extra(box, packed):
    done = on_box(box, "edgepack", "run", str(packed("llama", 4)), PROMPT, "--max-new-tokens", "4")
    assert_extra_error(done, "this bundle needs the torch extra (torch is not installed); edgepack's CPU "
                             "engine cannot run it: nf4 layers (int8, int4 and 16-bit only)", "torch")


def test_pull_and_profile_on_the_box(box, hub, packed, tmp_path):  # noqa: F811 - `hub` is a fixture
    from edgepack.hub import push

    repo = f"{DEFAULT_USER}/minimal-box"
    push(packed("llama", 8), repo)
    env = hub_env(hub, tmp_path / "hf_home", token=DEFAULT_TOKEN, base=box_env())  # online, to the fake Hub
    done = on_box(box, "edgepack", "pull", repo, "-o", str(tmp_path / "pulled"), env=env)
    assert done.returncode == 0, done.stderr
    done = on_box(box, "edgepack", "run", str(tmp_path / "pulled"), PROMPT, "--max-new-tokens", "4", "--stats")
    assert done.returncode == 0 and "native backend" in done.stderr, done.stderr
    done = on_box(box, "edgepack", "profile", "--out", str(tmp_path / "box.json"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "box.json").read_text())["ram_bytes"] > 0
