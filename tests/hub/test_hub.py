"""edgepack push / pull against the fake Hub (tests/hub_server.py), with the real huggingface_hub client.

Bundles come from the session's `packed` fixture (tiny models, a few hundred kB each), so every figure
below is small: a variant "needs" its weight bytes + the overhead of the backend that runs it
(edgepack.runtime.constants: 96 MiB for the C engine, 400 MiB with torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, hf_hub_download, metadata_load
from hub_server import DEFAULT_TOKEN, DEFAULT_USER, hub, hub_server  # noqa: F401

import edgepack
from edgepack.format import bundle as bundle_format
from edgepack import cli, hub as edgehub
from edgepack.hub import download
from edgepack.errors import BundleIntegrityError, HubError, OutputExistsError, VariantError
from edgepack.hub import choose_variant, pull, push, resolve_bundle_ref
from edgepack.plan.profile import DeviceProfile, load_profile
from edgepack.runtime.constants import NATIVE_OVERHEAD_BYTES, TORCH_OVERHEAD_BYTES

REPO = f"{DEFAULT_USER}/tiny-edge"
PROMPT = "The capital"
VARIANTS = {"pi5-8gb": ("llama", 4), "t4": ("llama", 8), "cpu-16gb": ("llama", 16)}
OPTIONS = {"pi5-8gb": {"quant_type": "int4"}}  # edgepack's CPU int4: the C engine runs all three


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Pulled bundles land under EDGEPACK_CACHE: one per test, so no test sees another's copy."""
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "edgepack-cache"))
    monkeypatch.setattr(download, "RETRY_DELAY_S", 0.0)


def generate(path: Path) -> str:
    return edgepack.load(path).generate(PROMPT, max_new_tokens=5, temperature=0)


def add_listed_file(bundle: Path, name: str, data: bytes) -> None:
    """Put a file in a bundle and list it in the manifest, so the bundle still verifies."""
    (bundle / name).write_bytes(data)
    manifest = json.loads((bundle / "edgepack.json").read_text())
    manifest["files"].append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    bundle_format.write_json_atomic(bundle / "edgepack.json", manifest)


def with_source(bundle: Path, source: dict) -> Path:
    """Give a bundle a Hub provenance (the manifest is not in its own file list: it still verifies)."""
    manifest = json.loads((bundle / "edgepack.json").read_text())
    manifest["source"] = source
    bundle_format.write_json_atomic(bundle / "edgepack.json", manifest)
    return bundle


def profile_with_ram(usable_bytes: int) -> DeviceProfile:
    """cpu-laptop-8gb (no GPU) with exactly `usable_bytes` of RAM left after its reserve."""
    d = load_profile("cpu-laptop-8gb").to_dict()
    d["ram_bytes"] = d["ram_reserved_bytes"] + usable_bytes
    return DeviceProfile.from_dict(d)


def need(bundle: Path) -> int:
    """RAM a Llama variant at int8, int4 or 16 bits needs on cpu-laptop-8gb (x86-64, AVX2): its
    weights and the C engine's overhead."""
    return bundle_format.read_manifest(bundle)["memory"]["weight_bytes"] + NATIVE_OVERHEAD_BYTES


def commits(server) -> list:
    return [r for r in server.requests if r[0] == "POST" and "/commit/" in r[1]]


@pytest.fixture
def three_variants(hub, packed) -> dict[str, Path]:
    """REPO with pi5-8gb (4-bit), t4 (8-bit) and cpu-16gb (16-bit), each pushed as a variant."""
    bundles = {name: packed(kind, bits, **OPTIONS.get(name, {})) for name, (kind, bits) in VARIANTS.items()}
    for name, path in bundles.items():
        push(path, REPO, variant=name)
    return bundles


# --- one bundle at the root ------------------------------------------------------------------------


def test_push_pull_verify_run_round_trip(hub, packed, tmp_path):
    original = packed("llama", 8)
    said: list[str] = []
    result = push(original, REPO, progress=said.append)
    assert len(commits(hub)) == 1 and result.commit_url.endswith(result.commit_sha)
    assert result.variant is None and result.files_uploaded == len(os.listdir(original))
    assert any("one commit" in m for m in said)
    remote = set(HfApi().list_repo_files(REPO))
    expected = {e["path"] for e in bundle_format.read_manifest(original)["files"]}
    assert remote == expected | {"edgepack.json", "README.md", "edgepack-variants.json", ".gitattributes"}

    pulled = pull(REPO, out=tmp_path / "out")
    assert pulled.path == tmp_path / "out" and pulled.variant is None and "only bundle" in pulled.reason
    assert pulled.commit == result.commit_sha
    assert sorted(os.listdir(pulled.path)) == sorted(os.listdir(original))
    assert not any(p.is_symlink() for p in pulled.path.iterdir())  # plain files, as verify_bundle wants
    bundle_format.verify_bundle(pulled.path, check_hashes=True)
    assert generate(pulled.path) == generate(original)

    cached = pull(f"hf://{REPO}@main")  # default location: edgepack's cache, keyed by commit
    assert cached.path == tmp_path / "edgepack-cache" / "hub" / REPO.replace("/", "--") / result.commit_sha / "_root"
    assert generate(cached.path) == generate(original)


def test_pull_again_reuses_a_verified_copy_and_repairs_a_damaged_one(hub, packed, tmp_path):
    push(packed("llama", 8), REPO)
    first = pull(REPO, out=tmp_path / "out")
    downloads = [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    again = pull(REPO, out=tmp_path / "out")
    assert again.path == first.path
    shard = first.path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.unlink()  # a hard link to the Hub cache's blob: replace it, do not write through it
    shard.write_bytes(bytes(data))
    pull(REPO, out=tmp_path / "out")
    bundle_format.verify_bundle(first.path, check_hashes=True)
    assert [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]] == downloads  # all from the cache


def test_push_refuses_a_damaged_bundle_before_any_request(hub, bundle_copy):
    bundle = bundle_copy("llama", 8)
    data = bytearray((bundle / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (bundle / "model.safetensors").write_bytes(bytes(data))
    hub.requests.clear()
    with pytest.raises(BundleIntegrityError, match="model.safetensors"):
        push(bundle, REPO)
    assert hub.requests == []


def test_push_to_a_branch(hub, packed, tmp_path):
    original = packed("gpt2", 4)
    result = push(original, REPO, revision="dev", commit_message="gpt2 4-bit on dev")
    assert result.revision == "dev"
    assert [c.title for c in HfApi().list_repo_commits(REPO, revision="dev")][0] == "gpt2 4-bit on dev"
    with pytest.raises(HubError, match="not an edgepack repo"):
        pull(REPO)  # main only has .gitattributes
    pulled = pull(f"{REPO}@dev", out=tmp_path / "dev")
    assert generate(pulled.path) == generate(original)


# --- variants -------------------------------------------------------------------------------------------


def test_three_variants_index_pull_and_run(three_variants, hub, tmp_path):
    index = json.loads(Path(hf_hub_download(REPO, "edgepack-variants.json")).read_text())
    assert [v["name"] for v in index["variants"]] == ["cpu-16gb", "pi5-8gb", "t4"] and index["root"] is None
    for v in index["variants"]:
        manifest = bundle_format.read_manifest(three_variants[v["name"]])
        assert v["path"] == v["name"] and v["bits"] == VARIANTS[v["name"]][1]
        assert v["scheme"] == manifest["quantization"]["scheme"] and v["memory"] == manifest["memory"]
        assert v["memory_need_bytes"] == manifest["memory"]["weight_bytes"] + TORCH_OVERHEAD_BYTES
        assert v["created_at"] == manifest["created_at"] and "target_profile" in v
    files = HfApi().list_repo_files(REPO)
    assert {f.split("/")[0] for f in files if "/" in f} == set(VARIANTS)
    for name, original in three_variants.items():
        pulled = pull(REPO, variant=name, out=tmp_path / name)
        assert pulled.variant == name and "--variant" in pulled.reason
        assert sorted(os.listdir(pulled.path)) == sorted(os.listdir(original))
        assert generate(pulled.path) == generate(original)


def test_pushing_a_variant_replaces_only_that_variant(three_variants, hub, bundle_copy, packed, tmp_path):
    api = HfApi()
    t4 = bundle_copy("llama", 8)
    add_listed_file(t4, "notes.txt", b"only in the first t4 push\n")
    push(t4, REPO, variant="t4")
    assert "t4/notes.txt" in api.list_repo_files(REPO)
    before = {f.path: f.blob_id for f in api.list_repo_tree(REPO, recursive=True) if hasattr(f, "blob_id")}

    replacement = packed("gpt2", 8)
    hub.requests.clear()
    result = push(replacement, REPO, variant="t4")
    assert len(commits(hub)) == 1 and result.files_deleted == 1
    after = {f.path: f.blob_id for f in api.list_repo_tree(REPO, recursive=True) if hasattr(f, "blob_id")}
    assert "t4/notes.txt" not in after
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert {p.split("/")[0] for p in changed} <= {"t4", "README.md", "edgepack-variants.json"}
    assert all(before[p] == after[p] for p in before if p.startswith(("pi5-8gb/", "cpu-16gb/")))

    index = json.loads(Path(hf_hub_download(REPO, "edgepack-variants.json")).read_text())
    t4_entry = next(v for v in index["variants"] if v["name"] == "t4")
    assert len(index["variants"]) == 3 and t4_entry["architecture"]["model_type"] == "gpt2"
    pulled = pull(REPO, variant="t4", out=tmp_path / "t4")
    assert generate(pulled.path) == generate(replacement)


def test_root_bundle_and_variants_side_by_side(hub, packed, bundle_copy, tmp_path):
    old_root = bundle_copy("llama", 16)
    add_listed_file(old_root, "root-notes.txt", b"old root bundle\n")
    push(old_root, REPO)
    push(packed("llama", 4), REPO, variant="pi5-8gb")
    new_root = packed("gpt2", 8)
    push(new_root, REPO)  # replaces the root bundle, keeps the variant
    files = set(HfApi().list_repo_files(REPO))
    assert "root-notes.txt" not in files and "pi5-8gb/model.safetensors" in files
    index = json.loads(Path(hf_hub_download(REPO, "edgepack-variants.json")).read_text())
    assert index["root"]["architecture"]["model_type"] == "gpt2" and len(index["variants"]) == 1
    pulled = pull(REPO, out=tmp_path / "root")
    assert pulled.variant is None and "root" in pulled.reason
    assert generate(pulled.path) == generate(new_root)


def test_unknown_variant_and_ambiguous_pull_list_the_variants(three_variants):
    with pytest.raises(VariantError, match="no variant 'rpi4'.*cpu-16gb, pi5-8gb, t4"):
        pull(REPO, variant="rpi4")
    with pytest.raises(VariantError, match="holds 3 variants") as err:
        pull(REPO)
    assert "--auto" in err.value.hint
    with pytest.raises(VariantError, match="must be 1-64 lowercase"):
        push(three_variants["t4"], REPO, variant="T4/../x")


# --- --auto -------------------------------------------------------------------------------------------------


def test_auto_picks_the_most_bits_that_fit_as_memory_shrinks(three_variants, tmp_path):
    needs = {name: need(path) for name, path in three_variants.items()}
    assert needs["cpu-16gb"] > needs["t4"] > needs["pi5-8gb"]
    cases = [
        (needs["cpu-16gb"] + 10 * 2**30, "cpu-16gb"),
        (needs["cpu-16gb"], "cpu-16gb"),  # exactly enough
        (needs["cpu-16gb"] - 1, "t4"),
        (needs["t4"], "t4"),
        (needs["t4"] - 1, "pi5-8gb"),
        (needs["pi5-8gb"], "pi5-8gb"),
    ]
    for usable, expected in cases:
        pulled = pull(REPO, profile=profile_with_ram(usable), out=tmp_path / f"auto-{usable}")
        assert pulled.variant == expected, (usable, pulled.reason)
        assert pulled.reason.startswith(f"{expected} (") and "cpu-laptop-8gb" in pulled.reason
        assert generate(pulled.path) == generate(three_variants[expected])
    assert "not cpu-16gb (16-bit)" in pulled.reason  # says why the bigger ones were passed over

    usable = needs["pi5-8gb"] - 1
    with pytest.raises(VariantError) as err:
        pull(REPO, profile=profile_with_ram(usable))
    message = err.value.message
    assert "no variant of" in message and "fits this box" in message
    for name in VARIANTS:
        assert f"{name} (" in message
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    assert f"{mib(needs['pi5-8gb'])} of RAM ({mib(usable)} usable)" in message
    assert "--variant NAME" in err.value.hint


def test_auto_on_the_command_line_prints_path_and_reason(three_variants, tmp_path, capsys):
    profile_file = tmp_path / "small-box.json"
    profile_file.write_text(json.dumps(profile_with_ram(need(three_variants["t4"])).to_dict()))
    rc = cli.main(["pull", REPO, "--auto", "--profile", str(profile_file), "-o", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == str(tmp_path / "out")
    assert "variant: t4 (8-bit int8-rowwise) is the best fit" in err and "ok:" in err
    bundle_format.verify_bundle(tmp_path / "out", check_hashes=True)


def _entry(name: str, bits: int, per_device: dict[str, int]) -> dict:
    weight = sum(per_device.values())
    return {"name": name, "path": name, "bits": bits, "scheme": "x", "target_profile": None,
            "weight_bytes": weight, "memory_need_bytes": weight + TORCH_OVERHEAD_BYTES,
            "memory": {"weight_bytes": weight, "weight_bytes_per_device": per_device}}


def test_choose_variant_counts_gpu_and_unified_memory():
    gib = 2**30
    entries = [_entry("cpu-16gb", 16, {"cpu": 14 * gib}), _entry("t4", 8, {"cuda:0": 7 * gib, "cpu": gib // 2}),
               _entry("pi5-8gb", 4, {"cpu": 4 * gib})]
    t4 = load_profile("t4")  # 14.25 GiB of GPU, 15 GiB of RAM usable
    chosen, reason = choose_variant(entries, t4)
    assert chosen["name"] == "t4" and "of GPU 0" in reason  # on the GPU beats more bits on the CPU
    # GPU too small for t4's 7 GiB: the best that runs from RAM
    d = t4.to_dict()
    d["gpus"][0]["reserved_bytes"] = d["gpus"][0]["memory_bytes"] - 6 * gib
    chosen, _ = choose_variant(entries, DeviceProfile.from_dict(d))
    assert chosen["name"] == "cpu-16gb"
    # No GPU at all: t4's cuda weights fall back to RAM with the rest (7.5 GiB + overhead)
    laptop = load_profile("cpu-laptop-8gb")  # 5.5 GiB usable
    chosen, reason = choose_variant(entries, laptop)
    assert chosen["name"] == "pi5-8gb" and "not cpu-16gb" in reason and "t4 (8-bit)" in reason
    # Unified memory (Jetson): one pool, counted once
    jetson = load_profile("jetson-orin-nano-8gb")
    pool = jetson.gpu_usable_bytes(0)
    fits = [e for e in entries if e["weight_bytes"] + TORCH_OVERHEAD_BYTES <= pool]
    chosen, reason = choose_variant(entries, jetson)
    assert chosen == max(fits, key=lambda e: (bool(e["memory"]["weight_bytes_per_device"].get("cuda:0")), e["bits"]))
    assert "unified memory" in reason


def test_choose_variant_counts_the_overhead_of_the_backend_that_runs_it():
    """An int8 Llama variant that fits a small CPU box only with the C engine's overhead is chosen
    there; the same sizes on torch (another architecture, nf4, a CPU without AVX2) do not fit."""
    mib = 2**20
    entry = _entry("rpi", 8, {"cpu": 300 * mib})
    entry["architecture"] = {"model_type": "llama"}
    d = load_profile("rpi4-4gb").to_dict()  # aarch64, no GPU
    d["ram_bytes"] = d["ram_reserved_bytes"] + 300 * mib + NATIVE_OVERHEAD_BYTES  # 396 MiB usable
    small = DeviceProfile.from_dict(d)
    assert NATIVE_OVERHEAD_BYTES < 100 * mib < TORCH_OVERHEAD_BYTES  # fits with the engine, not with torch
    chosen, reason = choose_variant([entry], small)
    assert chosen is entry and "edgepack's CPU engine" in reason and "396.0 MiB of RAM (396.0 MiB usable)" in reason

    gpt2 = {**entry, "architecture": {"model_type": "gpt2"}}
    nf4 = {**entry, "bits": 4, "scheme": "nf4"}
    for torch_only in (gpt2, nf4):
        with pytest.raises(VariantError, match="700.0 MiB of RAM"):
            choose_variant([torch_only], small)
    int4 = {**entry, "bits": 4, "scheme": "int4"}
    assert choose_variant([int4], small)[0] is int4
    d["cpu"] = {**d["cpu"], "arch": "x86_64", "simd": ["avx", "f16c"]}  # the engine is off without AVX2
    with pytest.raises(VariantError, match="700.0 MiB of RAM"):
        choose_variant([entry], DeviceProfile.from_dict(d))
    d["cpu"]["simd"] = ["avx", "avx2"]
    assert choose_variant([entry], DeviceProfile.from_dict(d))[0] is entry


# --- errors ---------------------------------------------------------------------------------------------------


def test_private_repo_refuses_a_missing_token(hub, packed, tmp_path, monkeypatch, capsys):
    push(packed("llama", 8), REPO, private=True)
    monkeypatch.delenv("HF_TOKEN")
    rc = cli.main(["pull", REPO, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"error: repository {REPO} not found or private" in err
    assert "hint: " in err and "set HF_TOKEN or pass --token" in err
    assert not (tmp_path / "out").exists()

    rc = cli.main(["pull", REPO, "-o", str(tmp_path / "out"), "--token", "hf_not_a_real_token"])
    assert rc == 1 and "error: the Hub refused the token (401" in capsys.readouterr().err

    rc = cli.main(["pull", REPO, "-o", str(tmp_path / "out"), "--token", DEFAULT_TOKEN])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip() == str(tmp_path / "out")

    rc = cli.main(["push", str(packed("llama", 8)), f"{DEFAULT_USER}/other"])
    err = capsys.readouterr().err
    assert rc == 1 and "needs a Hugging Face token with write access" in err and "HF_TOKEN" in err


def test_missing_repo_and_revision(hub, packed):
    with pytest.raises(HubError, match=f"repository {DEFAULT_USER}/nothing-here not found") as err:
        pull(f"{DEFAULT_USER}/nothing-here")
    assert "check the spelling" in err.value.hint
    push(packed("llama", 8), REPO)
    with pytest.raises(HubError, match="revision 'no-such-branch' not found in") as err:
        pull(f"{REPO}@no-such-branch")
    assert "branch, tag or commit" in err.value.hint
    with pytest.raises(HubError, match="not a Hub repo reference"):
        pull("not a repo")
    with pytest.raises(HubError, match="without @dev") as err:
        push(packed("llama", 8), f"{REPO}@dev")
    assert err.value.hint == "pass --revision dev"


def test_flipped_byte_on_the_server_is_caught_and_not_cached(hub, packed, tmp_path, capsys):
    push(packed("llama", 8), REPO)
    hub.corrupt(REPO, "model.safetensors")
    with pytest.raises(BundleIntegrityError, match="model.safetensors downloaded from the Hub does not match") as err:
        pull(REPO, out=tmp_path / "out")
    assert "removed from the cache" in err.value.hint
    assert not (tmp_path / "out").exists()  # nothing half-verified is left where a loader would look
    cache = tmp_path / "hf_home" / "hub" / f"models--{REPO.replace('/', '--')}"
    assert not list(cache.glob("snapshots/*/model.safetensors"))  # the bad copy is gone from the cache
    shard_get = ("GET", f"/{REPO}/resolve/{HfApi().repo_info(REPO).sha}/model.safetensors")
    gets = hub.requests.count(shard_get)

    rc = cli.main(["pull", REPO, "-o", str(tmp_path / "out")])  # downloads it again, still damaged
    err_text = capsys.readouterr().err
    assert rc == 1 and "error: " in err_text and "model.safetensors" in err_text and "hint: " in err_text
    assert hub.requests.count(shard_get) == gets + 1


def test_flipped_byte_in_a_manifest_is_caught(three_variants, hub, tmp_path):
    hub.corrupt(REPO, "t4/edgepack.json")
    with pytest.raises(BundleIntegrityError, match="t4/edgepack.json downloaded from the Hub does not match"):
        pull(REPO, variant="t4", out=tmp_path / "t4")
    assert not (tmp_path / "t4").exists()
    assert pull(REPO, variant="pi5-8gb", out=tmp_path / "pi5").variant == "pi5-8gb"


def test_pull_offline_from_the_cache(hub, packed, tmp_path, monkeypatch):
    from huggingface_hub import constants

    original = packed("llama", 8)
    push(original, REPO)
    pull(REPO, out=tmp_path / "online")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    pulled = pull(REPO, out=tmp_path / "offline")
    assert hub.requests == [] and generate(pulled.path) == generate(original)
    with pytest.raises(HubError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        pull(f"{DEFAULT_USER}/never-pulled")


def test_interrupted_download_resumes_and_ends_verified(hub, bundle_copy, tmp_path):
    bundle = bundle_copy("llama", 8)
    big = hashlib.sha256(b"edgepack").digest() * (12 * 2**20 // 32)  # 12 MiB: past one 10 MiB chunk
    add_listed_file(bundle, "big.bin", big)
    push(bundle, REPO)
    hub.fail_after("big.bin", 11_000_000)  # the connection drops after 11 MB
    pulled = pull(REPO, out=tmp_path / "out")
    [(path, range_header)] = hub.ranges
    assert path.endswith("/big.bin") and int(range_header.removeprefix("bytes=").removesuffix("-")) > 0
    assert (pulled.path / "big.bin").read_bytes() == big
    bundle_format.verify_bundle(pulled.path, check_hashes=True)
    assert generate(pulled.path) == generate(bundle)


def test_download_that_fails_is_retried_then_reported(hub, packed, tmp_path):
    push(packed("llama", 8), REPO)
    hub.fail_after("model.safetensors", 1000, then_status=500)  # the client's own retry gets a 500
    said: list[str] = []
    pulled = pull(REPO, out=tmp_path / "a", progress=said.append)  # our second attempt completes it
    assert any("attempt 2 of" in m for m in said)
    bundle_format.verify_bundle(pulled.path, check_hashes=True)

    shutil.rmtree(tmp_path / "hf_home" / "hub")  # start from an empty Hub cache
    for _ in range(edgehub.DOWNLOAD_ATTEMPTS):
        hub.fail_after("tokenizer.json", 1000, then_status=500)
    with pytest.raises(HubError, match="network failure") as err:
        pull(REPO, out=tmp_path / "b")
    assert "run the same command again" in err.value.hint and "resume" in err.value.hint
    assert not (tmp_path / "b").exists()
    assert pull(REPO, out=tmp_path / "b").path == tmp_path / "b"  # the network is back


def test_pull_refuses_to_overwrite_a_directory_that_is_not_a_bundle(hub, packed, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an edgepack bundle"):
        pull(REPO, out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- `edgepack run REPO_ID` ---------------------------------------------------------------------------------


def test_resolve_bundle_ref(hub, packed, tmp_path):
    local = packed("llama", 8)
    assert resolve_bundle_ref(local) == local
    assert resolve_bundle_ref(str(tmp_path / "missing")) == tmp_path / "missing"  # load() explains it
    push(local, REPO)
    said: list[str] = []
    for ref in (f"hf://{REPO}", REPO, f"{REPO}@main"):
        path = resolve_bundle_ref(ref, progress=said.append)
        assert bundle_format.read_manifest(path)["files"] == bundle_format.read_manifest(local)["files"]
    assert generate(path) == generate(local)
    assert said[-1].startswith("variant: (root) (8-bit int8-rowwise) is the best fit for this box")
    with pytest.raises(HubError, match="and there is no local directory"):
        resolve_bundle_ref(f"{DEFAULT_USER}/missing")


# --- the model card -------------------------------------------------------------------------------------------


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_metadata_parses_and_describes_every_variant(hub, packed, bundle_copy, tmp_path, capsys):
    source = {"kind": "hub", "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
    t4 = with_source(bundle_copy("llama", 8), source)
    push(packed("llama", 4), REPO, variant="pi5-8gb")
    rc = cli.main(["push", str(t4), REPO, "--variant", "t4", "--commit-message", "t4: 8-bit"])
    out = capsys.readouterr().out
    assert rc == 0 and "variant t4 (t4/)" in out and out.strip().endswith(HfApi().repo_info(REPO).sha)
    assert HfApi().list_repo_commits(REPO)[0].title == "t4: 8-bit"
    push(packed("llama", 16), REPO, variant="cpu-16gb")
    card_path = Path(hf_hub_download(REPO, "README.md"))
    text = card_path.read_text()

    meta = _front_matter(text)
    assert meta == metadata_load(card_path) == ModelCard.load(card_path).data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "edgepack" and meta["pipeline_tag"] == "text-generation"
    assert {"edgepack", "bitsandbytes", "8-bit", "4-bit", "pi5-8gb", "t4", "cpu-16gb"} <= set(meta["tags"])

    body = text.split("---\n", 2)[2]
    for name in VARIANTS:
        assert f"| {name} | `{name}/` |" in body
    assert "| t4 | `t4/` | t4 | 8-bit int8-rowwise |" in body
    assert "| t4 | bitsandbytes int8-rowwise (smoothed, GPTQ) |" in body  # the details say how it was rounded
    assert "| pi5-8gb | bitsandbytes nf4 |" in body
    top1 = bundle_format.read_manifest(t4)["verification"]["top1_agreement_vs_source"]
    assert f"{top1:.1%}" in body
    snippets = ("pip install edgepack", f"edgepack pull {REPO} --auto", f"edgepack run hf://{REPO}",
                "edgepack.load(pulled.path)", 'subfolder="pi5-8gb"', "Every variant is also an ordinary transformers checkpoint")
    for snippet in snippets:
        assert snippet in body, snippet


def test_model_card_without_known_source(hub, packed):
    push(packed("gpt2", 16), REPO)
    meta = _front_matter(Path(hf_hub_download(REPO, "README.md")).read_text())
    assert "base_model" not in meta and "license" not in meta  # a local path is no base_model
    assert meta["tags"] == ["edgepack"] and meta["library_name"] == "edgepack"


def test_model_card_of_an_int4_variant_does_not_promise_transformers(hub, packed):
    push(packed("llama", 4, quant_type="int4"), REPO, variant="rpi5-4gb")
    text = Path(hf_hub_download(REPO, "README.md")).read_text()
    meta = _front_matter(text)
    assert "bitsandbytes" not in meta["tags"] and "4-bit" in meta["tags"]
    body = text.split("---\n", 2)[2]
    assert "edgepack's own int4 CPU format, which plain transformers cannot load" in body
    assert "from_pretrained" not in body
    push(packed("llama", 8), REPO, variant="t4")
    body = Path(hf_hub_download(REPO, "README.md")).read_text().split("---\n", 2)[2]
    assert "Every other variant is also an ordinary transformers checkpoint" in body and 'subfolder="t4"' in body


# --- folders that are not edgepack's, and indexes that lie ------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def _upload_index(data: bytes) -> None:
    HfApi().upload_file(path_or_fileobj=data, path_in_repo=edgehub.INDEX_NAME, repo_id=REPO)


def test_pull_refuses_a_folder_with_a_fake_manifest_and_deletes_nothing(three_variants, tmp_path, capsys):
    victim = tmp_path / "victim"  # a file named edgepack.json does not make a folder a bundle
    (victim / "projects").mkdir(parents=True)
    (victim / "thesis.tex").write_text("x")
    (victim / "edgepack.json").write_text("{}")
    before = _snapshot(victim)
    rc = cli.main(["pull", REPO, "--variant", "pi5-8gb", "-o", str(victim)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    [error] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "not an edgepack bundle" in error and "hint: choose an empty or new folder" in err, err
    assert _snapshot(victim) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    out = pull(REPO, variant="t4", out=tmp_path / "b").path
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputExistsError, match="notes.md is not part of it"):
        pull(REPO, variant="pi5-8gb", out=out)
    assert (out / "notes.md").read_text() == "mine"
    (out / "notes.md").unlink()
    assert pull(REPO, variant="pi5-8gb", out=out).variant == "pi5-8gb"  # a bundle is replaced
    assert bundle_format.verify_bundle(out)["quantization"]["bits"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_pulled_files_get_the_umask_modes(hub, packed, tmp_path):
    push(packed("llama", 8), REPO)
    old = os.umask(0o027)
    try:
        pulled = pull(REPO, out=tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in pulled.path.rglob("*")}
    assert modes and set(modes.values()) == {0o640}, modes
    assert pulled.path.stat().st_mode & 0o777 == 0o750


def test_oversized_or_deeply_nested_index_is_refused_before_parsing(hub, packed, tmp_path):
    push(packed("llama", 8), REPO, variant="t4")
    index = json.loads(Path(hf_hub_download(REPO, edgehub.INDEX_NAME)).read_text())
    index["padding"] = "x" * edgehub.MAX_INDEX_BYTES
    _upload_index(json.dumps(index).encode())
    with pytest.raises(HubError, match=f"more than the {edgehub.MAX_INDEX_BYTES} bytes"):
        pull(REPO, out=tmp_path / "a")
    _upload_index(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(HubError, match="nested too deeply"):
        pull(REPO, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_auto_checks_the_index_figures_against_the_pulled_manifest(three_variants, tmp_path):
    index = json.loads(Path(hf_hub_download(REPO, edgehub.INDEX_NAME)).read_text())
    [entry] = [v for v in index["variants"] if v["name"] == "cpu-16gb"]
    entry.update(weight_bytes=1, memory_need_bytes=1 + TORCH_OVERHEAD_BYTES)  # "the 16-bit one fits anywhere"
    entry["memory"]["weight_bytes_per_device"] = {"cpu": 1}
    _upload_index(json.dumps(index).encode())
    box = profile_with_ram(need(three_variants["pi5-8gb"]))  # in truth only the 4-bit variant fits
    with pytest.raises(VariantError, match="cpu-16gb .*disagree") as err:
        pull(REPO, auto=True, profile=box, out=tmp_path / "out")
    assert "--variant" in err.value.hint
    assert not (tmp_path / "out").exists()
