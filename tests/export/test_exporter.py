"""The exporter: what a bundle holds, field by field, and that it holds exactly what
bitsandbytes produced."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors import safe_open

from edgepack.format import bundle as bundle_format
from edgepack.export import quantize
from edgepack.errors import OutputExistsError, QuantizationError, SourceNotFoundError, UnsupportedModelError
from edgepack.export.pack import pack, parse_size

KINDS = ["gpt2", "llama", "llama-untied"]


def stored(bundle) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(bundle.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def source_weights(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def out_in(name: str, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """bitsandbytes wants [out, in]; GPT-2's Conv1D stores [in, out]."""
    return weight.T.contiguous() if kind == "gpt2" else weight


@pytest.mark.parametrize("kind", KINDS)
def test_8bit_tensors_are_bitsandbytes_int8_rowwise(packed, tiny_models, kind):
    import bitsandbytes.functional as F

    bundle = packed(kind, 8, smoothing=False, gptq=False)  # smoothed: test_smoothing.py, GPTQ: test_gptq.py
    manifest = bundle_format.read_manifest(bundle)
    tensors, source = stored(bundle), source_weights(tiny_models[kind])
    quantized = manifest["quantization"]["quantized_modules"]
    assert len(quantized) == {"gpt2": 8, "llama": 14, "llama-untied": 14}[kind]
    for name in quantized:
        cb, scb, _ = F.int8_vectorwise_quant(out_in(name, source[f"{name}.weight"], kind).float())
        assert tensors[f"{name}.weight"].dtype == torch.int8
        assert torch.equal(tensors[f"{name}.weight"], cb)
        assert torch.equal(tensors[f"{name}.SCB"], scb)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("fp4", True)])
def test_4bit_tensors_are_bitsandbytes_packed(packed, tiny_models, kind, quant_type, double_quant):
    import bitsandbytes.functional as F

    bundle = packed(kind, 4, quant_type=quant_type, double_quant=double_quant)
    tensors, source = stored(bundle), source_weights(tiny_models[kind])
    for name in bundle_format.read_manifest(bundle)["quantization"]["quantized_modules"]:
        weight = out_in(name, source[f"{name}.weight"], kind).to(torch.bfloat16)
        packed_ref, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
        assert torch.equal(tensors[f"{name}.weight"], packed_ref)
        for key, value in state.as_dict(packed=True).items():
            assert torch.equal(tensors[f"{name}.weight.{key}"], value), key
        assert (f"{name}.weight.nested_absmax" in tensors) == double_quant


def test_16bit_bundle_stores_bfloat16_source_values(packed, tiny_models):
    tensors, source = stored(packed("llama", 16)), source_weights(tiny_models["llama"])
    assert set(tensors) == set(source) - {"lm_head.weight"}  # tied: stored once
    for key, value in tensors.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, source[key].to(torch.bfloat16))


def test_untied_lm_head_is_kept_16bit_with_reason(packed):
    manifest = bundle_format.read_manifest(packed("llama-untied", 8, table_bits=16))  # default: an 8-bit table
    assert "lm_head" not in manifest["quantization"]["quantized_modules"]
    assert "output layer" in manifest["quantization"]["kept_modules"]["lm_head"]
    assert manifest["tensors"]["lm_head.weight"]["dtype"] == "BF16"


def test_manifest_fields(packed, tiny_models):
    bundle = packed("llama", 4, quant_type="nf4", double_quant=True)
    m = bundle_format.read_manifest(bundle)
    assert (m["format"], m["format_version"]) == ("edgepack", 1)
    assert set(m["versions"]) >= {"edgepack", "torch", "transformers", "bitsandbytes", "safetensors", "python"}
    assert m["versions"]["torch"] == torch.__version__
    assert m["source"] == {"kind": "local", "path": str(tiny_models["llama"].resolve())}
    arch = m["architecture"]
    assert (arch["model_type"], arch["num_hidden_layers"], arch["hidden_size"]) == ("llama", 2, 64)
    assert (arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]) == (4, 2, 16)
    # 400-token vocab * 64 (tied embedding) + 2 layers * (4 attn: 64*64 + 64*32*2 + 64*64 = 12288,
    # mlp 3 * 64*128 = 24576, 2 norms * 64) + final norm 64
    assert arch["num_parameters"] == 400 * 64 + 2 * (12288 + 24576 + 128) + 64
    assert arch["vocab_size"] == 400 and arch["tie_word_embeddings"] is True
    q = m["quantization"]
    assert q | {"quantized_modules": None, "kept_modules": None} == {
        "bits": 4, "method": "bitsandbytes", "scheme": "nf4", "compute_dtype": "bfloat16",
        "storage_dtype": "bfloat16", "quant_type": "nf4", "blocksize": 64, "double_quant": True,
        "quantized_modules": None, "kept_modules": None,
    }
    assert q["quantized_modules"][0] == "model.layers.0.self_attn.q_proj"
    assert list(q["kept_modules"]) == ["lm_head"]
    assert m["device_map"] == {
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
        "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
    }
    on_disk = sorted(p.name for p in bundle.iterdir())
    listed = sorted(e["path"] for e in m["files"])
    assert on_disk == sorted([*listed, "edgepack.json"])
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(listed)
    for entry in m["files"]:
        assert entry["size"] == (bundle / entry["path"]).stat().st_size
        assert entry["sha256"] == bundle_format.sha256_file(bundle / entry["path"])
    weight_bytes = sum(t.numel() * t.element_size() for t in stored(bundle).values())
    assert m["memory"] == {"weight_bytes": weight_bytes, "weight_bytes_per_device": {"cpu": weight_bytes}}
    assert m["verification"]["tensors_bit_identical"] is True
    assert m["verification"]["logits_rel_error_vs_reference"] < 0.05
    assert 0 <= m["verification"]["top1_agreement_vs_source"] <= 1
    assert m["target_profile"] is None and m["created_at"].endswith("Z")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_plain_transformers_loads_the_bundle(packed, kind):
    """The plain-ecosystem escape hatch: transformers reads the same files at 16, 8 and 4
    bits (its own 4-bit *save* is what corrupts absmax on CPU; its loader is fine); at 8 bits
    packed with --table-bits 16 where the engine runs the model (its default 8-bit tables
    are edgepack's runtime only)."""
    from transformers import AutoModelForCausalLM

    import edgepack

    for bits in (16, 8, 4):
        bundle = packed(kind, bits, **({"table_bits": 16} if bits == 8 and kind == "llama" else {}))
        config = json.loads((bundle / "config.json").read_text())
        assert ("quantization_config" in config) == (bits < 16)
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        hf = AutoModelForCausalLM.from_pretrained(str(bundle))
        ours = edgepack.load(bundle).model  # edgepack's CPU engine for Llama, torch for GPT-2
        with torch.no_grad():
            a, b = hf(ids).logits[0].float(), quantize.logits(ours, ids[0].tolist())
        assert (a - b).norm() / b.norm() < 0.05, bits


def test_write_weights_shards_by_size_and_writes_index(packed, tmp_path):
    from edgepack.export.pack import _write_weights

    tensors = stored(packed("llama", 8))
    names = _write_weights(tmp_path, tensors, max_shard_bytes=20_000)
    assert len(names) > 2 and list(names)[0] == f"model-00001-of-{len(names):05d}.safetensors"
    for file_name, keys in names.items():
        size = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        assert size <= 20_000 or len(keys) == 1  # a tensor larger than the limit sits alone
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: f for f, keys in names.items() for k in keys}
    assert set(index["weight_map"]) == set(tensors)


def test_sharded_bundle_loads_and_generates_the_same(packed, tiny_models, tmp_path, monkeypatch):
    import edgepack
    from edgepack.export import pack as exporter

    monkeypatch.setattr(exporter, "_check_options", lambda *a: None)  # allow a 20 kB limit
    out = tmp_path / "many"
    pack(str(tiny_models["gpt2"]), out, bits=8, max_shard_bytes=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 2
    assert (out / "model.safetensors.index.json").is_file()
    one = edgepack.load(packed("gpt2", 8)).generate("The capital", max_new_tokens=6, temperature=0)
    assert edgepack.load(out).generate("The capital", max_new_tokens=6, temperature=0) == one


def test_out_exists_needs_force_and_force_replaces_only_a_bundle(tiny_models, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        pack(str(tiny_models["llama"]), out, bits=8)
    with pytest.raises(OutputExistsError, match="not an edgepack bundle") as err:
        pack(str(tiny_models["llama"]), out, bits=8, force=True)
    assert "choose an empty or new folder" in err.value.hint
    assert (out / "keep.txt").read_text() == "mine"  # nothing lost
    (out / "keep.txt").unlink()
    pack(str(tiny_models["llama"]), out, bits=16, force=True)  # an empty folder is taken
    pack(str(tiny_models["llama"]), out, bits=8, force=True)  # and a bundle replaced
    assert bundle_format.read_manifest(out)["quantization"]["bits"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp or old dirs left


def test_stale_temp_of_dead_pack_is_removed_a_folder_of_yours_is_not(tiny_models, tmp_path):
    dead, other = subprocess.Popen(["true"]), subprocess.Popen(["true"])
    dead.wait(), other.wait()
    stale = tmp_path / f".b.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (stale / bundle_format.UNFINISHED_NAME).write_text(json.dumps({"pid": dead.pid}))
    yours = tmp_path / f".b.old-{other.pid}"  # named like a temporary, not marked as one
    yours.mkdir()
    (yours / "thesis.tex").write_text("mine")
    pack(str(tiny_models["llama"]), tmp_path / "b", bits=16)
    assert not stale.exists()
    assert (yours / "thesis.tex").read_text() == "mine"


def test_failed_verification_publishes_nothing(tiny_models, tmp_path, monkeypatch):
    from edgepack.export import pack as exporter, quantize
    from edgepack.errors import ExportVerificationError

    real = quantize.compare_stored_tensors
    monkeypatch.setattr(quantize, "compare_stored_tensors", lambda d, t: real(d, t) + ["model.norm.weight"])
    with pytest.raises(ExportVerificationError, match="differ after writing"):
        exporter.pack(str(tiny_models["llama"]), tmp_path / "b", bits=8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs,error,text",
    [
        ({"bits": 3}, QuantizationError, "unsupported bits 3"),
        ({"bits": 4, "quant_type": "int3"}, QuantizationError, "quant type 'int3'"),
        ({"bits": 4, "blocksize": 100}, QuantizationError, "block size 100"),
        ({"bits": 4, "quant_type": "int4", "blocksize": 16}, QuantizationError, "int4 group size 16"),
        ({"bits": 4, "quant_type": "int4", "double_quant": True}, QuantizationError, "double-quant is a bitsandbytes nf4/fp4 option"),
        ({"dtype": "float64"}, QuantizationError, "16-bit dtype"),
    ],
)
def test_bad_options(tiny_models, tmp_path, kwargs, error, text):
    with pytest.raises(error, match=text):
        pack(str(tiny_models["llama"]), tmp_path / "b", **kwargs)
    assert not (tmp_path / "b").exists()


def test_source_errors(tmp_path):
    with pytest.raises(SourceNotFoundError, match="source not found"):
        pack(str(tmp_path / "nope"), tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="without config.json"):
        pack(str(tmp_path / "empty"), tmp_path / "b")


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(UnsupportedModelError, match="'vit' models are not causal language models"):
        pack(str(tmp_path / "vit"), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_missing_weights(tiny_models, tmp_path):
    import shutil

    shutil.copytree(tiny_models["llama"], tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match="cannot load"):
        pack(str(tmp_path / "m"), tmp_path / "b")


def test_unknown_architecture(tmp_path):
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text('{"model_type": "frobnicator", "hidden_size": 8}')
    with pytest.raises(UnsupportedModelError, match="cannot read the model config"):
        pack(str(tmp_path / "weird"), tmp_path / "b")


def test_parse_size():
    assert parse_size("512MB") == 512_000_000
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1000") == 1000
    with pytest.raises(QuantizationError, match="cannot read size"):
        parse_size("lots")


def test_pack_leaves_no_world_writable_or_temp_files(packed):
    bundle = packed("gpt2", 8)
    assert not [p for p in bundle.parent.iterdir() if ".tmp-" in p.name]
    for path in bundle.iterdir():
        assert not os.stat(path).st_mode & 0o002


@pytest.mark.parametrize("kind,bits", [("gpt2", 8), ("llama-untied", 4), ("llama", 8)])
def test_streaming_pack_equals_in_memory_pack(tiny_models, tmp_path, monkeypatch, kind, bits):
    """A safetensors checkpoint is quantized tensor by tensor from its shards; the bundle is
    byte for byte the one packing the loaded model gives, with the same quality figures."""
    from edgepack.export import pack as exporter

    messages = []
    streamed = pack(str(tiny_models[kind]), tmp_path / "s", bits=bits, progress=messages.append)
    assert "streaming the checkpoint tensor by tensor" in messages
    monkeypatch.setattr(exporter, "_streaming_source", lambda folder, config: None)
    loaded = pack(str(tiny_models[kind]), tmp_path / "l", bits=bits, progress=messages.append)
    assert "loaded the full-precision model" in messages
    digests = lambda m: {e["path"]: e["sha256"] for e in m["files"] if e["path"].endswith(".safetensors")}  # noqa: E731
    assert digests(streamed) == digests(loaded)
    for key in ("top1_agreement_vs_source", "mean_kl_vs_source", "logits_rel_error_vs_reference"):
        assert streamed["verification"][key] == pytest.approx(loaded["verification"][key], abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_int4_tensors_are_affine_groups_of_the_source(packed, tiny_models, kind):
    """edgepack's CPU int4: codes within half a step of the source in every group of 32,
    scale and zero 16-bit, manifest and config say what it is, transformers refuses it."""
    from transformers import AutoModelForCausalLM

    bundle = packed(kind, 4, quant_type="int4")
    manifest = bundle_format.read_manifest(bundle)
    quant = manifest["quantization"]
    assert (quant["method"], quant["scheme"], quant["quant_type"], quant["blocksize"]) == ("edgepack", "int4", "int4", 32)
    tensors, source = stored(bundle), source_weights(tiny_models[kind])
    assert len(quant["quantized_modules"]) == {"gpt2": 8, "llama": 14, "llama-untied": 14}[kind]
    for name in quant["quantized_modules"]:
        w = out_in(name, source[f"{name}.weight"], kind).float()
        packed_w, sz = tensors[f"{name}.weight"], tensors[f"{name}.weight.scales_and_zeros"]
        assert packed_w.dtype == torch.uint8 and tuple(packed_w.shape) == (w.shape[0], w.shape[1] // 2)
        assert sz.dtype == torch.bfloat16 and tuple(sz.shape) == (w.shape[1] // 32, w.shape[0], 2)
        codes = torch.stack((packed_w & 15, packed_w >> 4), -1).reshape(w.shape).float()
        scale = sz[..., 0].float().T.repeat_interleave(32, dim=1)
        zero = sz[..., 1].float().T.repeat_interleave(32, dim=1)
        err = ((codes - 8) * scale + zero - w).abs()
        # half a step, plus the bf16 rounding of scale and zero (relative 2^-8 of a group's span)
        assert bool((err <= scale * 0.5 + (w.abs() + 8 * scale) * 2**-7).all()), name
    assert "quantization_config" not in json.loads((bundle / "config.json").read_text())
    with pytest.raises(Exception, match="mismatched"):
        AutoModelForCausalLM.from_pretrained(str(bundle))


def test_int4_keeps_layers_the_kernel_cannot_run_in_16bit():
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgepack.export.quantize import INT4_SHAPE_REASON, Settings, quantize_model

    # hidden 48 (not a multiple of the group 32): only down_proj ([48, 64]) can run int4
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=3)
    result = quantize_model(LlamaForCausalLM(config).eval(), Settings(4, "int4", blocksize=32), lambda _m: None)
    assert result.quantized_modules == ["model.layers.0.mlp.down_proj"]
    kept = {k: v for k, v in result.kept_modules.items() if k != "lm_head"}
    assert len(kept) == 6 and set(kept.values()) == {INT4_SHAPE_REASON}
    assert result.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_bundle_files_get_the_umask_modes(tiny_models, tmp_path, umask, file_mode, dir_mode):
    """A bundle packed by one user must be readable by the runtime's user in the Docker image
    (uid 10001) under the usual umask 022: no file may come out 0600."""
    old = os.umask(umask)
    try:
        out = tmp_path / "b"
        pack(str(tiny_models["llama"]), out, bits=8)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert bundle_format.MANIFEST_NAME in modes
    assert modes == {p.name: dir_mode if p.is_dir() else file_mode for p in out.rglob("*")}, modes
    assert out.stat().st_mode & 0o777 == dir_mode
