"""A damaged, tampered-with or crafted bundle never runs and never takes anything down.

* the corruption matrix: each kind of damage makes `edgepack verify` and `edgepack run`
  exit 1 with a specific one-line error, no traceback, nothing on stdout;
* a shard truncated between verification and reading raises, it does not SIGBUS;
* fuzzing (hypothesis) of the manifest reader and the bundle loader: only EdgepackError;
* signatures: any changed, added, missing or renamed file, or another key, fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from crafting import craft_shard, edit_manifest, load_manifest, read_shard, reseal, save_manifest, write_shard

from edgepack.format import bundle
from edgepack.format import manifest as manifest_format
from edgepack import cli
from edgepack.errors import BundleIntegrityError, EdgepackError, SignatureError

SHARD = "model.safetensors"
EMBED = "model.embed_tokens.weight"


# --- the kinds of damage -----------------------------------------------------------------------


def _truncate(b: Path) -> None:
    with open(b / SHARD, "r+b") as f:
        f.truncate(100_000)


def _flip_byte(b: Path, rel: str = SHARD, offset: int = -1000) -> None:
    with open(b / rel, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def _symlink_out(b: Path) -> None:
    outside = b.parent / "outside-tokenizer.json"
    shutil.copy(b / "tokenizer.json", outside)  # same bytes: only the link itself is wrong
    (b / "tokenizer.json").unlink()
    (b / "tokenizer.json").symlink_to(outside)


def _fifo(b: Path) -> None:
    (b / "tokenizer_config.json").unlink()
    os.mkfifo(b / "tokenizer_config.json")


def _overlap(header: dict) -> None:
    a, c = header["model.layers.0.self_attn.q_proj.SCB"], header["model.layers.0.self_attn.k_proj.SCB"]
    c["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + 128]  # k_proj.SCB is F32[32]


def _shape_in_shard(header: dict) -> None:
    header[EMBED]["shape"] = [200, 128]  # same bytes, another shape


def _config(b: Path) -> None:
    config = json.loads((b / "config.json").read_text())
    config["vocab_size"] = 512
    (b / "config.json").write_text(json.dumps(config, indent=2))
    reseal(b, "config.json")


def _set(path: list, value):
    def edit(m: dict) -> None:
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


# kind -> (damage(bundle_dir), distinctive substring of the error line)
KINDS = {
    "truncated shard": (_truncate, "model.safetensors is 100000 bytes, the manifest says"),
    "flipped byte in shard": (_flip_byte, "model.safetensors does not match its sha256"),
    "flipped byte in tokenizer": (lambda b: _flip_byte(b, "tokenizer.json", -10), "tokenizer.json does not match its sha256"),
    "missing file": (lambda b: (b / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "extra file": (lambda b: (b / "notes.txt").write_text("hi"), "notes.txt is not listed in the manifest"),
    "renamed file": (lambda b: (b / SHARD).rename(b / "model-renamed.safetensors"),
                     "model.safetensors is missing; model-renamed.safetensors is not listed"),
    "missing manifest": (lambda b: (b / "edgepack.json").unlink(), "has no edgepack.json"),
    "manifest not JSON": (lambda b: (b / "edgepack.json").write_text('{"format": "edgepack", '), "edgepack.json is not valid JSON"),
    "manifest duplicate key": (lambda b: (b / "edgepack.json").write_text('{"format": "edgepack", "format": "x"}'), "duplicate key 'format'"),
    "manifest missing keys": (lambda b: edit_manifest(b, lambda m: (m.pop("files"), m.pop("memory"))),
                              "missing key 'memory'; missing key 'files'"),
    "manifest wrong types": (lambda b: edit_manifest(b, _set(["quantization", "bits"], "8")), "quantization.bits must be int"),
    "future format version": (lambda b: edit_manifest(b, _set(["format_version"], 2)),
                              "bundle format version 2 is not one this edgepack reads"),
    "path traversal": (lambda b: edit_manifest(b, _set(["files", 0, "path"], "../../etc/passwd")),
                       "path '../../etc/passwd' has '..'"),
    "absolute path": (lambda b: edit_manifest(b, _set(["files", 0, "path"], "/etc/passwd")), "path '/etc/passwd' is absolute"),
    "symlink out of the bundle": (_symlink_out, "tokenizer.json is a symlink or not a regular file"),
    "fifo instead of a file": (_fifo, "tokenizer_config.json is a symlink or not a regular file"),
    "huge safetensors header": (lambda b: craft_shard(b, lambda h: b"{" + b" " * (bundle.MAX_HEADER_BYTES + 10) + b"}"),
                                "-byte safetensors header (limit 16777216"),
    "header length past the file": (lambda b: (_flip_header_len(b), reseal(b, SHARD)), "declares a 1099511627776-byte"),
    "header not JSON": (lambda b: craft_shard(b, lambda h: b"{\"a\": [1, 2"), "safetensors header is not valid JSON"),
    "overlapping offsets": (lambda b: craft_shard(b, _overlap), "overlaps another tensor"),
    "offsets outside the file": (lambda b: craft_shard(b, lambda h: h[EMBED].update(data_offsets=[0, 10**9])),
                                 "points outside the file"),
    "dtype mismatch": (lambda b: edit_manifest(b, _set(["tensors", EMBED, "dtype"], "F16")), "is BF16[400, 64], the manifest says F16[400, 64]"),
    "shape mismatch": (lambda b: craft_shard(b, _shape_in_shard), "is BF16[200, 128], the manifest says BF16[400, 64]"),
    "tensor missing from shard": (lambda b: edit_manifest(b, _set(["tensors", "model.extra.weight"], {"file": SHARD, "dtype": "F32", "shape": [1]})),
                                  "1 tensors listed in the manifest are in no shard (first: 'model.extra.weight')"),
    "tensor not in manifest": (lambda b: edit_manifest(b, lambda m: m["tensors"].pop("model.norm.weight")),
                               "tensor 'model.norm.weight' is not in the manifest's tensor table"),
    "config disagrees with weights": (_config, "config.json disagrees with the weights: vocab_size 512 and hidden size 64"),
}


def _flip_header_len(b: Path) -> None:
    with open(b / SHARD, "r+b") as f:
        f.write((2**40).to_bytes(8, "little"))


def same_size_header(path: Path, header: dict) -> bytes:
    """Header bytes padded with spaces (as safetensors pads) to the length of path's."""
    length = int.from_bytes(path.read_bytes()[:8], "little")
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= length
    return raw + b" " * (length - len(raw))


def _assert_one_line_error(rc: int, out: str, err: str, text: str) -> None:
    assert rc == 1, (rc, err)
    assert out == "", out
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and text in lines[0], lines
    assert len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:]), lines


@pytest.mark.parametrize("kind", list(KINDS))
def test_corruption_matrix(kind, bundle_copy, capsys):
    damage, text = KINDS[kind]
    b = bundle_copy("llama", 8, table_bits=16)
    damage(b)
    capsys.readouterr()
    for argv in (["verify", str(b)], ["run", str(b), "The capital of France", "--max-new-tokens", "2"]):
        rc = cli.main(argv)
        captured = capsys.readouterr()
        _assert_one_line_error(rc, captured.out, captured.err, text)


def test_matrix_has_at_least_15_kinds():
    assert len(KINDS) >= 15


@pytest.mark.parametrize("kind", ["truncated shard", "path traversal", "overlapping offsets", "config disagrees with weights"])
def test_corruption_matrix_in_a_real_process(kind, bundle_copy):
    damage, text = KINDS[kind]
    b = bundle_copy("llama", 8, table_bits=16)
    damage(b)
    for argv in (["verify", str(b)], ["run", str(b), "hello", "--max-new-tokens", "2"]):
        proc = subprocess.run([sys.executable, "-m", "edgepack.cli", *argv], capture_output=True, text=True, timeout=120)
        _assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, text)


def test_runtime_checks_the_skeleton_beyond_what_verify_can_see(bundle_copy, capsys):
    """intermediate_size is not in the embedding: verify passes, the runtime refuses when the
    stored tensor does not fit the layer config.json builds (meta skeleton, no weights)."""
    b = bundle_copy("llama", 8, table_bits=16)
    config = json.loads((b / "config.json").read_text())
    config["intermediate_size"] = 96
    (b / "config.json").write_text(json.dumps(config))
    reseal(b, "config.json")
    assert cli.main(["verify", str(b)]) == 0
    capsys.readouterr()
    rc = cli.main(["run", str(b), "hello", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.out, captured.err, "but config.json implies")
    assert "96, 64]" in captured.err or "96]" in captured.err


def test_crafted_config_that_transformers_refuses(bundle_copy, capsys):
    b = bundle_copy("llama", 8, table_bits=16)
    config = json.loads((b / "config.json").read_text())
    config["model_type"] = "no-such-model"
    (b / "config.json").write_text(json.dumps(config))
    reseal(b, "config.json")
    rc = cli.main(["run", str(b), "hello", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.out, captured.err, "cannot build the model that config.json describes")


# --- a file changed while loading ----------------------------------------------------------------


def test_truncated_after_verification_raises_not_sigbus(bundle_copy, monkeypatch):
    import edgepack
    from edgepack import runtime

    b = bundle_copy("llama", 8, table_bits=16)
    verify = bundle.verify_bundle

    def verify_then_truncate(*args, **kwargs):
        manifest = verify(*args, **kwargs)
        with open(b / SHARD, "r+b") as f:
            f.truncate(50_000)
        return manifest

    monkeypatch.setattr(runtime.bundle_format, "verify_bundle", verify_then_truncate)
    with pytest.raises(BundleIntegrityError, match="while loading, the manifest says 132992"):
        edgepack.load(b, verify=True)


def test_truncated_while_reading_tensors_raises(bundle_copy, monkeypatch):
    import edgepack
    from edgepack import runtime

    b = bundle_copy("llama", 8, table_bits=16)
    verify, read_header = bundle.verify_bundle, bundle.read_shard_header

    def header_then_truncate(f, *args, **kwargs):
        result = read_header(f, *args, **kwargs)  # the size matched: now the file shrinks
        with open(b / SHARD, "r+b") as g:
            g.truncate(60_000)
        return result

    def verify_then_hook(*args, **kwargs):
        manifest = verify(*args, **kwargs)
        monkeypatch.setattr(runtime.bundle_format, "read_shard_header", header_then_truncate)
        return manifest

    monkeypatch.setattr(runtime.bundle_format, "verify_bundle", verify_then_hook)
    with pytest.raises(BundleIntegrityError, match="model.safetensors ended .* bytes early while loading"):
        edgepack.load(b, verify=True)


TRUNCATE_IN_A_PROCESS = """
import sys
from edgepack.format import bundle
from edgepack.format import manifest as manifest_format
from edgepack import cli
verify, read_header = bundle.verify_bundle, bundle.read_shard_header
def header_then_truncate(f, *args, **kwargs):
    result = read_header(f, *args, **kwargs)
    with open(sys.argv[1] + "/model.safetensors", "r+b") as g:
        g.truncate(60_000)
    return result
def verify_then_hook(*args, **kwargs):
    manifest = verify(*args, **kwargs)
    bundle.read_shard_header = header_then_truncate
    return manifest
bundle.verify_bundle = verify_then_hook
sys.exit(cli.main(["run", sys.argv[1], "hello", "--max-new-tokens", "2"]))
"""


def test_truncated_while_loading_in_a_real_process(bundle_copy):
    """A process that memory-maps the shard dies of SIGBUS here (returncode -7)."""
    b = bundle_copy("llama", 8, table_bits=16)
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_IN_A_PROCESS, str(b)], capture_output=True, text=True, timeout=120)
    _assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "ended")
    assert "bytes early while loading" in proc.stderr


def test_replaced_after_verification_with_another_header_is_refused(bundle_copy, monkeypatch):
    import edgepack
    from edgepack import runtime

    b = bundle_copy("llama", 8, table_bits=16)
    verify = bundle.verify_bundle

    def verify_then_replace(*args, **kwargs):
        manifest = verify(*args, **kwargs)
        header, data = read_shard(b / SHARD)
        header[EMBED]["shape"] = [200, 128]
        tmp = b / "replacement"
        write_shard(tmp, same_size_header(b / SHARD, header), data)
        os.replace(tmp, b / SHARD)
        return manifest

    monkeypatch.setattr(runtime.bundle_format, "verify_bundle", verify_then_replace)
    with pytest.raises(BundleIntegrityError, match="the manifest says BF16.400, 64."):
        edgepack.load(b, verify=True)


# --- fuzzing -------------------------------------------------------------------------------------

FUZZ = {"deadline": None, "suppress_health_check": list(HealthCheck)}
JSON_LEAVES = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
JSON = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
MANIFEST_KEYS = [*manifest_format._TOP_LEVEL, "path", "size", "sha256", "file", "dtype", "shape", "bits", "weight_bytes"]


@settings(max_examples=250, **FUZZ)
@given(data=JSON | st.dictionaries(st.sampled_from(MANIFEST_KEYS), JSON, max_size=12))
def test_fuzz_validate_manifest_on_any_json(data):
    if isinstance(data, dict) and data:
        data.setdefault("format", "edgepack")
        data.setdefault("format_version", 1)
    try:
        bundle.validate_manifest(data)
    except EdgepackError:
        pass


def _paths(value, prefix=()):
    """Every path (tuple of keys/indices) inside a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_manifests(draw, manifest: dict):
    import copy

    m = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(m) if p]
        path = draw(st.sampled_from(paths))
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "wrap", "stringify"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "wrap":
            parent[path[-1]] = [parent[path[-1]]]
        else:
            parent[path[-1]] = json.dumps(parent[path[-1]])
    return m


@pytest.fixture(scope="module")
def fuzz_bundle(packed, tmp_path_factory) -> Path:
    """One private bundle copy the fuzz tests rewrite and restore in place."""
    dest = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(packed("llama", 8), dest)
    return dest


def test_fuzz_mutated_real_manifests(fuzz_bundle):
    """Mutated real manifests, validated and then used to verify the real bundle."""
    original = load_manifest(fuzz_bundle)

    @settings(max_examples=300, **FUZZ)
    @given(m=mutated_manifests(original))
    def run(m):
        save_manifest(fuzz_bundle, m)
        try:
            bundle.verify_bundle(fuzz_bundle, check_hashes=True)
        except EdgepackError:
            pass

    try:
        run()
    finally:
        save_manifest(fuzz_bundle, original)


@st.composite
def byte_mutations(draw, raw: bytes, focus: int):
    """A few byte flips, insertions, deletions or a truncation, mostly in raw[:focus]."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        end = focus if draw(st.integers(0, 9)) else len(data)
        where = draw(st.integers(0, max(0, min(end, len(data)) - 1)))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[where] = draw(st.sampled_from(b'{}[]",:0123456789-e. \x00\xff'))
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[where : where + draw(st.integers(1, 8))]
        elif action == "truncate":
            del data[where:]
    return bytes(data)


def _read_with_torch_reader(bundle_dir: Path) -> None:
    from edgepack.runtime.torch import model as torch_model

    manifest = bundle.verify_bundle(bundle_dir, check_hashes=True)
    for _ in torch_model.read_shard(bundle_dir / SHARD, manifest, SHARD):
        pass


def _load_and_run_native(bundle_dir: Path) -> None:
    import edgepack

    edgepack.load(bundle_dir, verify=True, backend="native").generate("The", max_new_tokens=2)


@pytest.mark.parametrize("reader,examples", [(_read_with_torch_reader, 300), (_load_and_run_native, 150)],
                         ids=["torch-reader", "native-engine"])
def test_fuzz_shard_header_bytes(fuzz_bundle, reader, examples):
    """Mutated shard headers, resealed in the manifest so the parser is reached; then
    verify_bundle and the torch backend's shard reader, or a whole load and run by edgepack's
    CPU engine (which hands addresses to C): a result or an EdgepackError, never a crash."""
    shard = fuzz_bundle / SHARD
    raw, manifest_raw = shard.read_bytes(), (fuzz_bundle / "edgepack.json").read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    outcomes = {"refused": 0, "accepted": 0}

    @settings(max_examples=examples, **FUZZ)
    @given(data=byte_mutations(raw, header_end))
    def run(data):
        shard.write_bytes(data)
        reseal(fuzz_bundle, SHARD)
        try:
            reader(fuzz_bundle)
            outcomes["accepted"] += 1
        except EdgepackError:
            outcomes["refused"] += 1

    try:
        run()
    finally:
        shard.write_bytes(raw)
        (fuzz_bundle / "edgepack.json").write_bytes(manifest_raw)
    assert outcomes["refused"] > 0


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                 "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings",
                                 "rms_norm_eps", "rope_theta", "tie_word_embeddings"])
def test_crafted_config_numbers_through_the_native_engine(bundle_copy, key):
    """config.json passes its hash but lies about a dimension: refused with an EdgepackError
    (or, for harmless values, loaded and run), never a crash in C."""
    import edgepack

    b = bundle_copy("llama", 8, table_bits=16)
    base = json.loads((b / "config.json").read_text())
    for value in (0, -1, 1, 3, 7, 10**9, 2.5, None, "x"):
        config = dict(base, **{key: value})
        (b / "config.json").write_text(json.dumps(config))
        reseal(b, "config.json")
        try:
            edgepack.load(b, backend="native").generate("The", max_new_tokens=2)
        except EdgepackError:
            pass


def test_fuzz_manifest_bytes(fuzz_bundle):
    """Mutated bytes of edgepack.json, then the whole loader's checks."""
    path = fuzz_bundle / "edgepack.json"
    raw = path.read_bytes()

    @settings(max_examples=200, **FUZZ)
    @given(data=byte_mutations(raw, len(raw)))
    def run(data):
        path.write_bytes(data)
        try:
            bundle.verify_bundle(fuzz_bundle, check_hashes=True)
        except EdgepackError:
            pass

    try:
        run()
    finally:
        path.write_bytes(raw)


FUZZ_CASES = 250 + 300 + 300 + 200  # the max_examples above: 1,050 generated cases per run


def test_fuzz_budget():
    assert FUZZ_CASES >= 1000


# --- signatures ------------------------------------------------------------------------------------

needs_cryptography = pytest.mark.skipif(
    importlib.util.find_spec("cryptography") is None, reason="signing needs cryptography (pip install edgepack[sign])"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from edgepack.format import signing

    root = tmp_path_factory.mktemp("keys")
    private, public, _ = signing.generate_key(root / "key.pem")
    other_private, other_public, _ = signing.generate_key(root / "other.pem")
    return {"private": private, "public": public, "other_private": other_private, "other_public": other_public}


@pytest.fixture
def signed(bundle_copy, keys, capsys):
    b = bundle_copy("llama", 8, table_bits=16)
    assert cli.main(["sign", str(b), "--key", str(keys["private"])]) == 0
    assert "signed" in capsys.readouterr().out
    return b


@needs_cryptography
def test_sign_and_verify(signed, keys, capsys):
    sig = json.loads((signed / "edgepack.sig").read_text())
    assert set(sig) == {"format", "version", "algorithm", "key_id", "manifest_sha256", "signature"}
    assert sig["algorithm"] == "ed25519" and sig["format"] == "edgepack-signature"
    assert cli.main(["verify", str(signed), "--key", str(keys["public"])]) == 0
    assert "signature" in capsys.readouterr().out
    assert cli.main(["verify", str(signed)]) == 0  # the .sig file is allowed beside the listed files


@needs_cryptography
def test_generated_private_key_is_private(keys):
    assert keys["private"].stat().st_mode & 0o077 == 0
    assert b"PUBLIC KEY" in keys["public"].read_bytes()


def _tamper_manifest(b: Path) -> None:
    edit_manifest(b, lambda m: m["source"].update(path="/somewhere/else"))


def _tamper_consistently(b: Path) -> None:
    """A changed file with its manifest entry updated: only the signature can tell."""
    _flip_byte(b, "tokenizer.json", -10)
    reseal(b, "tokenizer.json")


TAMPERING = {
    "changed file": (lambda b: _flip_byte(b, "tokenizer.json", -10), "tokenizer.json does not match its sha256"),
    "changed file, manifest updated": (_tamper_consistently, "signature of bundle"),
    "added file": (lambda b: (b / "extra.bin").write_bytes(b"x"), "extra.bin is not listed"),
    "missing file": (lambda b: (b / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "renamed file": (lambda b: (b / "tokenizer.json").rename(b / "tok.json"), "tokenizer.json is missing"),
    "edited manifest": (_tamper_manifest, "does not match its edgepack.json"),
    "signature removed": (lambda b: (b / "edgepack.sig").unlink(), "is not signed"),
    "signature garbled": (lambda b: (b / "edgepack.sig").write_text("{}"), "edgepack.sig is malformed"),
    "signature bit flipped": (lambda b: _flip_sig(b), "does not match its edgepack.json"),
}


def _flip_sig(b: Path) -> None:
    import base64

    sig = json.loads((b / "edgepack.sig").read_text())
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[0] ^= 1
    sig["signature"] = base64.b64encode(bytes(raw)).decode()
    (b / "edgepack.sig").write_text(json.dumps(sig))


@needs_cryptography
@pytest.mark.parametrize("kind", list(TAMPERING))
def test_tampering_fails_signature_verification(kind, signed, keys, capsys):
    damage, text = TAMPERING[kind]
    damage(signed)
    capsys.readouterr()
    rc = cli.main(["verify", str(signed), "--key", str(keys["public"])])
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.out, captured.err, text)


@needs_cryptography
def test_wrong_key_fails(signed, keys, capsys):
    rc = cli.main(["verify", str(signed), "--key", str(keys["other_public"])])
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.out, captured.err, "was signed by key")


@needs_cryptography
def test_signature_by_another_key_with_a_forged_key_id_fails(signed, keys):
    from edgepack.format import signing

    sig = json.loads((signed / "edgepack.sig").read_text())
    other = signing.load_public_key(keys["other_public"])
    sig["key_id"] = signing.key_id(other)
    (signed / "edgepack.sig").write_text(json.dumps(sig))
    with pytest.raises(SignatureError, match="does not match its edgepack.json"):
        signing.verify_signature(signed, keys["other_public"])


@needs_cryptography
def test_signature_is_standard_ed25519_over_prefix_and_manifest(signed, keys):
    """The documented format, checked with cryptography directly (as any verifier would)."""
    import base64

    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    sig = json.loads((signed / "edgepack.sig").read_text())
    message = b"edgepack-manifest-v1\n" + (signed / "edgepack.json").read_bytes()
    load_pem_public_key(keys["public"].read_bytes()).verify(base64.b64decode(sig["signature"]), message)


@needs_cryptography
def test_sign_refuses_a_damaged_bundle_and_bad_keys(bundle_copy, keys, tmp_path, capsys):
    b = bundle_copy("llama", 8, table_bits=16)
    _flip_byte(b)
    assert cli.main(["sign", str(b), "--key", str(keys["private"])]) == 1
    assert "does not match its sha256" in capsys.readouterr().err
    assert not (b / "edgepack.sig").exists()
    (tmp_path / "junk.pem").write_text("not a key")
    assert cli.main(["sign", str(b), "--key", str(tmp_path / "junk.pem")]) == 1
    assert "is not an unencrypted PEM private key" in capsys.readouterr().err
    assert cli.main(["sign", "--generate-key", str(keys["private"])]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["sign", str(b)]) == 1
    assert "needs a BUNDLE and --key" in capsys.readouterr().err
