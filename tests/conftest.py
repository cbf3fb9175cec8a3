"""Shared fixtures: the tiny models of tests/tiny.py saved as folders, and bundles packed
from them. Nothing here touches the network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# helpers imported by name: tiny.py and families.py from tests/, the fake Hub from tests/hub/ (cli tests use it too)
sys.path.insert(0, str(Path(__file__).parent / "hub"))
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model, make_tokenizer  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the verified-hash records and HF caches of the tests out of the user's home."""
    cache = tmp_path_factory.mktemp("edgepack-cache")
    old = {k: os.environ.get(k) for k in ("EDGEPACK_CACHE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    os.environ.update(EDGEPACK_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True, scope="session")
def _float_activations():
    """Float32 activations in the engine's decode steps for the whole run (the default is int8
    per block of 32 on x86): its tests hold logits to 1e-4 of float64's, and batched steps to
    single ones bitwise. tests/runtime/engine/test_activations.py turns int8 on where it tests it."""
    old = os.environ.get("EDGEPACK_ACTIVATION_BITS")
    os.environ["EDGEPACK_ACTIVATION_BITS"] = "32"  # for processes tests start, and engines loaded here
    try:
        from edgepack.runtime.engine import _engine
    except ImportError:  # the C module is not built: nothing runs int8 activations
        _engine = None
    previous = _engine.activation_bits(32) if _engine else None
    yield
    if _engine:
        _engine.activation_bits(previous)
    if old is None:
        os.environ.pop("EDGEPACK_ACTIVATION_BITS", None)
    else:
        os.environ["EDGEPACK_ACTIVATION_BITS"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Local HF model directories: tiny GPT-2 (Conv1D, tied), Llama (tied) and Llama with a
    separate lm_head."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer()
    paths = {}
    for kind in ("gpt2", "llama", "llama-untied"):
        model = make_model(kind, len(tokenizer))
        path = root / kind
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[kind] = path
    return paths


_PACKED: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def packed(tiny_models, tmp_path_factory):
    """packed(kind, bits, **options) -> bundle dir, packed once per session per setting."""
    from edgepack.export.pack import pack

    root = tmp_path_factory.mktemp("bundles")

    def get(kind: str, bits: int, **options) -> Path:
        key = (kind, bits, tuple(sorted(options.items())))
        if key not in _PACKED:
            out = root / "-".join([kind, str(bits), *(f"{k}={v}" for k, v in sorted(options.items()))])
            pack(str(tiny_models[kind]), out, bits=bits, **options)
            _PACKED[key] = out
        return _PACKED[key]

    return get


@pytest.fixture
def bundle_copy(packed, tmp_path):
    """copy(kind, bits) -> a private copy of a packed bundle that a test may damage."""
    import shutil

    def copy(kind: str = "llama", bits: int = 8, **options) -> Path:
        dest = tmp_path / f"copy-{kind}-{bits}"
        shutil.copytree(packed(kind, bits, **options), dest)
        return dest

    return copy
