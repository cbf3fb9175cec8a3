"""8-bit tables (``pack(..., table_bits=8)``): the embedding table and output layer stored as
int8 rows with a float32 scale each. The engine's logits against a float64 Llama over the
stored int8 values, the torch backend beside it, the manifest field, the planner's bytes,
and bundles without the field."""

from __future__ import annotations

import copy

import pytest
import torch

import edgepack
from edgepack.errors import ManifestError, QuantizationError
from edgepack.format import manifest as manifest_format
from edgepack.runtime.torch.model import read_shard

pytest.importorskip("edgepack.runtime.engine._engine", reason="the C extension is not built here")
from test_native import _float64_logits, _logits, isa  # noqa: E402,F401  (this folder is on sys.path under pytest)


def _stored(bundle) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(bundle.glob("*.safetensors")) for k, v in read_shard(shard)}


def _exact_reference(bundle):
    """The torch backend's model of ``bundle`` with its tables replaced by the stored int8
    values times their scales, in float64 (the torch backend holds them rounded to 16 bits)."""
    ref = edgepack.load(bundle, backend="torch").model
    stored = _stored(bundle)
    def exact(module: str) -> torch.nn.Parameter:
        codes, absmax = stored[module + ".weight"].double(), stored[module + ".SCB"].double()
        return torch.nn.Parameter(codes * (absmax / 127)[:, None], requires_grad=False)

    ref.embed = exact("model.embed_tokens")
    ref.lm_head.weight = exact("lm_head") if "lm_head.SCB" in stored else ref.embed
    return ref


@pytest.mark.parametrize("kind,bits", [("llama", 8), ("llama-untied", 8), ("llama", 16), ("llama", 4)])
def test_8bit_tables_match_float64(packed, isa, kind, bits):
    """Decode steps and a prompt through the engine give float64's logits (over the stored
    int8 tables) to float32 rounding, as the 16-bit tables do."""
    options = {"quant_type": "int4"} if bits == 4 else {}
    bundle = packed(kind, bits, table_bits=8, **options)
    lm = edgepack.load(bundle)
    assert lm.backend == "native"
    tables = lm.manifest["quantization"]["tables"]
    assert tables == {"bits": 8, "scheme": "int8-rowwise",
                      "modules": ["model.embed_tokens"] + (["lm_head"] if kind == "llama-untied" else [])}
    assert lm.manifest["tensors"]["model.embed_tokens.weight"]["dtype"] == "I8"
    assert "lm_head" not in lm.manifest["quantization"]["kept_modules"]
    ids = (lm.tokenizer.encode("Water boils at one hundred degrees, and ice melts at zero. ") * 8)[:70]
    exact = _float64_logits(_exact_reference(bundle), ids)
    scale = exact.abs().max()
    cache = lm.model.new_cache(len(ids))
    steps = torch.stack([_logits(lm.model.forward([t], cache)) for t in ids[:12]])
    assert (steps - exact[:12]).abs().max() <= 1e-4 * scale
    got = _logits(lm.model.forward(ids[12:], cache))  # the prompt path after them
    assert (got - exact[-1]).abs().max() <= 1e-4 * scale


def test_8bit_tables_on_the_torch_backend_and_in_the_pack_check(packed):
    """The torch backend dequantizes the tables at load: it agrees with the engine, and the
    exporter's own check against its in-memory model passed."""
    bundle = packed("llama-untied", 8, table_bits=8)
    ours = edgepack.load(bundle)
    theirs = edgepack.load(bundle, backend="torch")
    assert theirs.model.embed.dtype in (torch.bfloat16, torch.float16)
    prompt = dict(max_new_tokens=6, min_new_tokens=6, temperature=0)
    assert ours.generate("The capital", **prompt) == theirs.generate("The capital", **prompt)
    assert ours.manifest["verification"]["logits_rel_error_vs_reference"] <= 0.05


def test_8bit_tables_halve_the_table_bytes_and_the_planner_counts_them(packed, tiny_models):
    from transformers import AutoConfig

    from edgepack.plan.model import describe_model
    from edgepack.plan.sizing import Quant, weight_bytes

    for kind in ("llama", "llama-untied"):
        wide, narrow = edgepack.load(packed(kind, 8)).manifest, edgepack.load(packed(kind, 8, table_bits=8)).manifest
        vocab, hidden = wide["tensors"]["model.embed_tokens.weight"]["shape"]
        tables = 1 if kind == "llama" else 2
        assert wide["memory"]["weight_bytes"] - narrow["memory"]["weight_bytes"] == tables * (vocab * hidden - 4 * vocab)
        desc = describe_model(AutoConfig.from_pretrained(tiny_models[kind]))
        assert weight_bytes(desc, Quant(8, table_bits=8)) == narrow["memory"]["weight_bytes"]
        assert weight_bytes(desc, Quant(8)) == wide["memory"]["weight_bytes"]


def test_bundles_without_the_field_load_with_16bit_tables(packed):
    """Every bundle packed before quantization.tables existed has none: its tables are 16-bit."""
    lm = edgepack.load(packed("llama", 8))
    assert "tables" not in lm.manifest["quantization"]
    assert lm.manifest["tensors"]["model.embed_tokens.weight"]["dtype"] == "BF16"
    assert lm.backend == "native"
    assert lm.generate("The capital", max_new_tokens=3, min_new_tokens=3, temperature=0)


@pytest.mark.parametrize("edit,problem", [
    (lambda t: t.update(bits=4), "tables.bits must be 8"),
    (lambda t: t.update(scheme="nf4"), "tables.scheme"),
    (lambda t: t.update(modules=[]), "non-empty list"),
    (lambda t: t.update(modules=["model.nowhere"]), "no .weight and .SCB"),
    (lambda t: t.update(modules=["model.norm"]), "no .weight and .SCB"),
])
def test_the_tables_field_is_validated(packed, edit, problem):
    good = edgepack.load(packed("llama", 8, table_bits=8)).manifest
    manifest_format.validate_manifest(copy.deepcopy(good))
    bad = copy.deepcopy(good)
    edit(bad["quantization"]["tables"])
    with pytest.raises(ManifestError, match=problem):
        manifest_format.validate_manifest(bad)


def test_a_table_stored_in_the_wrong_dtype_is_refused(packed):
    bad = copy.deepcopy(edgepack.load(packed("llama", 8, table_bits=8)).manifest)
    bad["tensors"]["model.embed_tokens.weight"]["dtype"] = "BF16"
    with pytest.raises(ManifestError, match="must be I8"):
        manifest_format.validate_manifest(bad)
    bad["quantization"]["tables"] = "yes"
    with pytest.raises(ManifestError, match="tables must be an object"):
        manifest_format.validate_manifest(bad)


def test_unknown_table_bits_are_refused(tiny_models, tmp_path):
    from edgepack.export.pack import pack

    with pytest.raises(QuantizationError, match="table bits 4"):
        pack(str(tiny_models["llama"]), tmp_path / "out", bits=8, table_bits=4)
    assert not (tmp_path / "out").exists()


def test_inspect_names_the_8bit_tables(packed):
    from edgepack.format.verify import describe

    shown = describe(edgepack.load(packed("llama-untied", 8, table_bits=8)).manifest)
    assert "8-bit tables: model.embed_tokens, lm_head (int8-rowwise)" in shown
    assert "kept 16-bit:  lm_head" not in shown
    assert "8-bit tables" not in describe(edgepack.load(packed("llama-untied", 8)).manifest)
