"""The bundle format module on its own: schema, paths, headers, config check, reads.

The helpers that craft damaged-but-consistent bundles live in tests/crafting.py."""

from __future__ import annotations

import copy
import io
import json
import os
import struct
from pathlib import Path

import pytest

from edgepack.format import bundle
from edgepack.format import manifest as manifest_format
from edgepack.format import safetensors as safetensors_format
from edgepack.errors import BundleIntegrityError, BundleNotFoundError, EdgepackError, ManifestError

from crafting import edit_manifest, load_manifest, reseal, write_shard  # tests/crafting.py


@pytest.fixture(scope="module")
def real_manifest(packed) -> dict:
    return load_manifest(packed("llama", 8))


def test_real_manifest_validates(real_manifest):
    assert bundle.validate_manifest(copy.deepcopy(real_manifest)) == real_manifest


def test_every_schema_problem_is_listed_at_once(real_manifest):
    m = copy.deepcopy(real_manifest)
    del m["created_at"]
    m["device_map"]["model.norm"] = True
    m["quantization"]["bits"] = 3
    m["files"][0]["size"] = -1
    m["files"][1]["sha256"] = "ABC"
    m["files"][2]["path"] = "../outside"
    m["memory"]["weight_bytes"] = "big"
    name = next(iter(m["tensors"]))
    m["tensors"][name]["shape"] = [4, True]
    with pytest.raises(ManifestError) as err:
        bundle.validate_manifest(m)
    text = str(err.value)
    for fragment in ("missing key 'created_at'", "device_map['model.norm']", "quantization.bits must be 16, 8 or 4",
                     "files[0].size", "files[1].sha256", "files[2].path '../outside' has '..'",
                     "memory.weight_bytes", f"tensors['{name}'].shape", "(8 problems)"):
        assert fragment in text, fragment
    assert err.value.hint


@pytest.mark.parametrize(
    "data,text",
    [
        ([], "must be a JSON object, not list"),
        ({"format": "gguf"}, "format is 'gguf'"),
        ({"format": "edgepack", "format_version": 2}, "bundle format version 2 is not one this edgepack reads"),
        ({"format": "edgepack", "format_version": True}, "bundle format version True"),
        ({"format": "edgepack", "format_version": 1.0}, "bundle format version 1.0"),
        ({"format": "edgepack", "format_version": 1}, "missing key 'files'"),
    ],
)
def test_manifest_gate(data, text):
    with pytest.raises(ManifestError, match=None) as err:
        bundle.validate_manifest(data)
    assert text in str(err.value)


@pytest.mark.parametrize(
    "edit,text",
    [
        (lambda m: m["files"].append(dict(m["files"][0])), "is listed twice"),
        (lambda m: m["files"].append({"path": "edgepack.json", "size": 1, "sha256": "0" * 64}), "may not be listed"),
        (lambda m: m["files"][0].update(path="/etc/passwd"), "is absolute"),
        (lambda m: m["files"][0].update(path="C:/x"), "is absolute"),
        (lambda m: m["files"][0].update(path="a\\b"), "backslash"),
        (lambda m: m["files"][0].update(path="a//b"), "empty parts"),
        (lambda m: m["files"][0].update(path=["x"]), "path must be a non-empty string"),
        (lambda m: next(iter(m["tensors"].values())).update(file=["x"]), "is not a listed file"),
        (lambda m: next(iter(m["tensors"].values())).update(dtype={"a": 1}), "is not a safetensors dtype"),
        (lambda m: m["quantization"].update(quantized_modules="model.layers"), "quantized_modules must be a list"),
        (lambda m: m["quantization"].update(compute_dtype="int3"), "compute_dtype must be one of"),
        (lambda m: m["quantization"].update(bits=4), "blocksize must be a positive integer"),
        (lambda m: m["memory"].update(weight_bytes_per_device={"cpu": -5}), "weight_bytes_per_device"),
    ],
)
def test_schema_problems(real_manifest, edit, text):
    m = copy.deepcopy(real_manifest)
    edit(m)
    with pytest.raises(ManifestError) as err:
        bundle.validate_manifest(m)
    assert text in str(err.value)


def test_manifest_duplicate_keys_and_deep_nesting_are_refused():
    with pytest.raises(ManifestError, match="duplicate key 'format'"):
        bundle.parse_manifest(b'{"format": "edgepack", "format": "x"}')
    with pytest.raises(ManifestError, match="nested too deeply"):
        bundle.parse_manifest(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ManifestError, match="not UTF-8"):
        bundle.parse_manifest(b"\xff\xfe{}")
    with pytest.raises(ManifestError, match="not valid JSON"):
        bundle.parse_manifest(b'{"format_version": ' + b"9" * 5000 + b"}")


def test_manifest_too_large_is_refused_before_reading(bundle_copy, monkeypatch):
    b = bundle_copy("llama", 8)
    monkeypatch.setattr(manifest_format, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(ManifestError, match="more than the 1000 bytes"):
        bundle.read_manifest(b)


def test_manifest_symlink_and_missing(bundle_copy, tmp_path):
    b = bundle_copy("llama", 8)
    outside = tmp_path / "elsewhere.json"
    (b / "edgepack.json").rename(outside)
    with pytest.raises(BundleNotFoundError, match="has no edgepack.json"):
        bundle.verify_bundle(b)
    (b / "edgepack.json").symlink_to(outside)
    with pytest.raises(ManifestError, match="is a symlink or not a regular file"):
        bundle.verify_bundle(b)
    with pytest.raises(BundleNotFoundError, match="is not a directory"):
        bundle.verify_bundle(tmp_path / "nope")


# --- safetensors headers ---------------------------------------------------------------------


def _shard(tmp_path: Path, header, data: bytes = b"") -> Path:
    path = tmp_path / "x.safetensors"
    write_shard(path, header, data)
    return path


def test_header_ok_and_metadata_checked(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "I8", "shape": [], "data_offsets": [8, 9]}}
    assert set(bundle.read_safetensors_header(_shard(tmp_path, header, bytes(9)))) == {"a", "b"}
    header["__metadata__"] = {"format": 1}
    with pytest.raises(BundleIntegrityError, match="__metadata__ must map strings to strings"):
        bundle.read_safetensors_header(_shard(tmp_path, header, bytes(9)))


@pytest.mark.parametrize(
    "header,data_bytes,text",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "overlaps another tensor"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "leaves a gap before it"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 8, "4 trailing bytes"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "holds 8 bytes but F32[3] needs 12"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, 8, "points outside the file"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8, "malformed header entry"),
        ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, 8, "malformed header entry"),
        ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "malformed header entry"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": "ab"}}, 8, "malformed header entry"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, 8, "malformed header entry"),
        ({"a": [1, 2]}, 8, "malformed header entry"),
        (b"[1, 2]", 0, "not a JSON object"),
        (b"{\"a\": ", 0, "not valid JSON"),
        (b"{\"a\": {}, \"a\": {}}", 0, "duplicate key"),
    ],
)
def test_header_problems(tmp_path, header, data_bytes, text):
    with pytest.raises(BundleIntegrityError) as err:
        bundle.read_safetensors_header(_shard(tmp_path, header, bytes(data_bytes)))
    assert text in str(err.value)


def test_header_size_cap_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 5000) + b" " * 5000)
    with pytest.raises(BundleIntegrityError, match="declares a 5000-byte safetensors header .limit 4096"):
        bundle.read_safetensors_header(path, max_header_bytes=4096)
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(BundleIntegrityError, match="declares a 9223372036854775808-byte"):
        bundle.read_safetensors_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(BundleIntegrityError, match="too short"):
        bundle.read_safetensors_header(path)
    assert bundle.MAX_HEADER_BYTES <= 100_000_000 // 4  # well below safetensors' own 100 MB


def test_shard_size_is_checked_again_on_the_open_file(tmp_path):
    path = _shard(tmp_path, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, bytes(4))
    with bundle.open_regular(path) as f:
        header, start = bundle.read_shard_header(f, "x", expected_size=path.stat().st_size)
        assert start == path.stat().st_size - 4
        with pytest.raises(BundleIntegrityError, match="while loading, the manifest says 99"):
            bundle.read_shard_header(f, "x", expected_size=99)


def test_read_exact_into_refuses_a_short_file():
    buf = bytearray(10)
    bundle.read_exact_into(io.BytesIO(bytes(range(20))), 5, memoryview(buf), "x")
    assert bytes(buf) == bytes(range(5, 15))
    with pytest.raises(BundleIntegrityError, match="x ended 5 bytes early while loading"):
        bundle.read_exact_into(io.BytesIO(bytes(10)), 5, memoryview(bytearray(10)), "x")


def test_open_regular_refuses_symlinks_and_fifos(tmp_path):
    target = tmp_path / "t"
    target.write_bytes(b"x")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        bundle.open_regular(tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BundleIntegrityError, match="not a regular file"):
        bundle.open_regular(tmp_path / "fifo")  # and it does not block


# --- the bundle as a whole ------------------------------------------------------------------------


def test_verify_bundle_ok_on_every_packed_kind(packed):
    for kind in ("gpt2", "llama", "llama-untied"):
        manifest = bundle.verify_bundle(packed(kind, 8))
        assert manifest["format_version"] == bundle.FORMAT_VERSION


def test_sizes_are_checked_before_hashes(bundle_copy, monkeypatch):
    b = bundle_copy("llama", 8)
    with open(b / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    hashed = []
    monkeypatch.setattr(bundle, "sha256_file", lambda p: hashed.append(p) or "0" * 64)
    with pytest.raises(BundleIntegrityError, match="truncated or replaced"):
        bundle.verify_bundle(b)
    assert hashed == []


def test_hashes_are_checked_before_headers_are_parsed(bundle_copy, monkeypatch):
    b = bundle_copy("llama", 8)
    with open(b / "model.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 2**40))
    parsed = []
    monkeypatch.setattr(safetensors_format, "read_shard_header", lambda *a, **k: parsed.append(a))
    with pytest.raises(BundleIntegrityError, match="does not match its sha256"):
        bundle.verify_bundle(b)
    assert parsed == []


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_config_is_checked_against_the_tensor_table(bundle_copy, kind):
    b = bundle_copy(kind, 8)
    config = json.loads((b / "config.json").read_text())
    config["vocab_size"] += 1
    (b / "config.json").write_text(json.dumps(config))
    reseal(b, "config.json")
    with pytest.raises(BundleIntegrityError, match="config.json disagrees with the weights: vocab_size 401"):
        bundle.verify_bundle(b)
    config["vocab_size"] -= 1
    config["n_layer" if kind == "gpt2" else "num_hidden_layers"] = 3
    (b / "config.json").write_text(json.dumps(config))
    reseal(b, "config.json")
    with pytest.raises(BundleIntegrityError, match=r"it describes 3 layers, the weights hold layers \[0, 1\]"):
        bundle.verify_bundle(b)


def test_config_missing_or_not_json(bundle_copy):
    b = bundle_copy("llama", 8)
    (b / "config.json").write_text("[1]")
    reseal(b, "config.json")
    with pytest.raises(BundleIntegrityError, match="config.json is not a JSON object"):
        bundle.verify_bundle(b)
    (b / "config.json").unlink()
    edit_manifest(b, lambda m: m.update(files=[e for e in m["files"] if e["path"] != "config.json"]))
    with pytest.raises(BundleIntegrityError, match="lists no config.json"):
        bundle.verify_bundle(b)


def test_unreadable_file_is_an_edgepack_error(bundle_copy, monkeypatch):
    b = bundle_copy("llama", 8)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(bundle, "sha256_file", denied)
    with pytest.raises(BundleIntegrityError, match="cannot read .* Permission denied"):
        bundle.verify_bundle(b)


def test_every_failure_is_an_edgepack_error():
    assert issubclass(BundleIntegrityError, EdgepackError) and issubclass(ManifestError, EdgepackError)
