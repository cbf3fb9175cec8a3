"""8-bit tables (``pack(..., table_bits=8)``, the default for 8-bit and int4 bundles): the
embedding table and output layer stored as int8 with a float16 scale per block of 32
(int8-block32), or with a float32 scale per row (int8-rowwise, bundles packed before
block scales, and rows that are not whole blocks). The kernels and the engine's logits
against float64 over the stored values, the torch backend beside it, the manifest field,
verify, the planner's bytes, and bundles without the field."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import edgepack
from edgepack.errors import BundleIntegrityError, ManifestError, QuantizationError
from edgepack.format import manifest as manifest_format
from edgepack.runtime.torch.model import read_shard

pytest.importorskip("edgepack.runtime.engine._engine", reason="the C extension is not built here")
from test_native import _float64_logits, _logits, isa, native  # noqa: E402,F401  (this folder is on sys.path under pytest)


def _stored(bundle) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(bundle.glob("*.safetensors")) for k, v in read_shard(shard)}


def _table64(stored: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """A stored 8-bit table's value in float64, from either layout."""
    codes = stored[module + ".weight"].double()
    if module + ".SCB" in stored:
        return codes * (stored[module + ".SCB"].double() / 127)[:, None]
    scales = stored[module + ".weight.scales"].double()
    return codes * scales.repeat_interleave(32, dim=1)


def _exact_reference(bundle):
    """The torch backend's model of ``bundle`` with its tables replaced by the stored int8
    values times their scales, in float64 (the torch backend holds them rounded to 16 bits)."""
    ref = edgepack.load(bundle, backend="torch").model
    stored = _stored(bundle)
    exact = lambda module: torch.nn.Parameter(_table64(stored, module), requires_grad=False)  # noqa: E731
    ref.embed = exact("model.embed_tokens")
    ref.lm_head.weight = exact("lm_head") if "lm_head.weight" in stored else ref.embed
    return ref


@pytest.fixture(scope="module")
def rowwise(tiny_models, tmp_path_factory):
    """rowwise(kind) -> a bundle with int8-rowwise tables (what --table-bits 8 wrote before
    block scales), packed once per kind."""
    from edgepack.export import quantize
    from edgepack.export.pack import pack

    made = {}

    def get(kind: str):
        if kind not in made:
            chosen, out = quantize.table_scheme, tmp_path_factory.mktemp("rowwise") / kind
            quantize.table_scheme = lambda widths: quantize.TABLE_SCHEME_ROWWISE
            try:
                pack(str(tiny_models[kind]), out, bits=8, table_bits=8)
            finally:
                quantize.table_scheme = chosen
            made[kind] = out
        return made[kind]

    return get


def _scales(pattern: str, kind: str, rows: int, cols: int, gen: torch.Generator):
    """(int8 codes, float16 block scales, the float64 matrix) for the kernel tests"""
    codes = torch.randint(-127, 128, (rows, cols), generator=gen, dtype=torch.int8)
    scales = (torch.rand(rows, cols // 32, generator=gen) / 64 + 1e-3).to(torch.float16)
    if pattern == "subnormal":  # float16's smallest values and zero blocks
        scales[:, ::3] = torch.tensor(0x0001, dtype=torch.int16).view(torch.float16)
        scales[:, 1::3] = 0
    return codes, scales, codes.double() * scales.double().repeat_interleave(32, dim=1)


@pytest.mark.parametrize("rows,cols", [(1, 32), (3, 64), (7, 96), (33, 576), (130, 640)])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("pattern", ["plain", "subnormal"])
def test_block_scale_kernels_match_float64(isa, rows, cols, threads, pattern):
    """INT8_B32 rows on every instruction set (generic, AVX2, AVX-512 where the CPU has it),
    row counts off the 4-row unit, rows split over threads: y = W x + bias with W the codes
    times their block's float16 scale, to float32 accumulation."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    codes, scales, exact = _scales(pattern, "INT8_B32", rows, cols, gen)
    bias, x = torch.randn(rows, generator=gen), torch.randn(cols, generator=gen)
    y = torch.full((rows,), float("nan"))
    native.gemv((native.INT8_B32, rows, cols, codes.data_ptr(), scales.data_ptr(), bias.data_ptr()),
                x.data_ptr(), y.data_ptr(), threads)
    want = exact @ x.double() + bias.double()
    bound = 1e-5 * (exact.abs() @ x.double().abs() + bias.double().abs()) + 1e-6
    assert torch.all((y.double() - want).abs() <= bound), (y, want)


def test_block_scale_matrices_must_be_whole_blocks_with_scales():
    x, y, w = torch.zeros(64), torch.zeros(4), torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="bad matrix"):  # no scales
        native.gemv((native.INT8_B32, 4, 64, w.data_ptr(), None, None), x.data_ptr(), y.data_ptr(), 1)
    with pytest.raises(ValueError, match="bad matrix"):  # 48 columns: a partial block
        native.gemv((native.INT8_B32, 4, 48, w.data_ptr(), w.data_ptr(), None), x.data_ptr(), y.data_ptr(), 1)


def test_block_quantization_rounds_to_nearest_on_the_stored_scale():
    from edgepack.export.quantize import quantize_table_blocks

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(50, 96, generator=gen) * torch.logspace(-3, 1, 50)[:, None]
    w[4, 32:64] = 0  # a zero block: scale 0, codes 0
    codes, scales = quantize_table_blocks(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (50, 3)
    step = scales.float().repeat_interleave(32, dim=1)
    value = codes.float() * step
    assert torch.all((value - w).abs() <= step / 2 * 1.001 + 1e-12)  # nearest, clamped at 127 by < 0.1%
    assert scales[4, 1] == 0 and torch.all(codes[4, 32:64] == 0)
    assert codes.abs().max() == 127
    with pytest.raises(QuantizationError, match="too large"):
        quantize_table_blocks(torch.full((1, 32), 1e7))


@pytest.mark.parametrize("kind,bits,scheme", [("llama", 8, "int8-block32"), ("llama-untied", 8, "int8-block32"),
                                              ("llama", 16, "int8-block32"), ("llama", 4, "int8-block32"),
                                              ("llama", 8, "int8-rowwise"), ("llama-untied", 8, "int8-rowwise")])
def test_8bit_tables_match_float64(packed, rowwise, isa, kind, bits, scheme):
    """Decode steps and a prompt through the engine give float64's logits (over the stored
    int8 tables) to float32 rounding, as the 16-bit tables do; per-row bundles (packed
    before block scales) load and run as before."""
    options = {"quant_type": "int4"} if bits == 4 else {}
    bundle = packed(kind, bits, **options, **({"table_bits": 8} if bits == 16 else {})) if scheme == "int8-block32" else rowwise(kind)
    lm = edgepack.load(bundle)
    assert lm.backend == "native"
    tables = lm.manifest["quantization"]["tables"]
    assert tables == {"bits": 8, "scheme": scheme,
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


def test_8bit_tables_on_the_torch_backend_and_in_the_pack_check(packed, rowwise):
    """The torch backend dequantizes the tables at load: it agrees with the engine, and the
    exporter's own check against its in-memory model passed."""
    for bundle in (packed("llama-untied", 8), rowwise("llama-untied")):
        ours = edgepack.load(bundle)
        theirs = edgepack.load(bundle, backend="torch")
        assert theirs.model.embed.dtype in (torch.bfloat16, torch.float16)
        prompt = dict(max_new_tokens=6, min_new_tokens=6, temperature=0)
        assert ours.generate("The capital", **prompt) == theirs.generate("The capital", **prompt)
        assert ours.manifest["verification"]["logits_rel_error_vs_reference"] <= 0.05


def _last_logits(lm, ids: list[int]) -> torch.Tensor:
    if lm.backend == "native":
        return _logits(lm.model.forward(ids, lm.model.new_cache(len(ids))))
    return lm.model.forward(torch.tensor([ids])).logits[0, -1].double()


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_block_tables_stay_close_to_16bit_tables(packed, rowwise, backend):
    """Last-token logits of the default bundle (8-bit tables, a scale per block of 32) against
    the same bundle with 16-bit tables, on the engine and the torch backend. Engine: relative
    L2 error <= 0.01 and no more than with a scale per row (measured 0.0080 / 0.0091 tied,
    0.0091 / 0.0096 untied; these random tables' rows are only 2 blocks wide); torch backend,
    which holds the tables in bfloat16: <= 0.02 (measured 0.0115)."""
    ids = edgepack.load(packed("llama", 8), verify=False).tokenizer.encode("Water boils at one hundred degrees. ") * 3
    errors = {}
    for kind in ("llama", "llama-untied"):
        wide = edgepack.load(packed(kind, 8, table_bits=16), backend=backend)
        for name, bundle in (("block32", packed(kind, 8)), ("rowwise", rowwise(kind))):
            lm = edgepack.load(bundle, backend=backend)
            assert lm.backend == backend
            worst = 0.0
            for n in (4, 12, len(ids)):
                got, want = (_last_logits(m, ids[:n]) for m in (lm, wide))
                worst = max(worst, _rel_l2(got, want))
            errors[kind, name] = worst
        if backend == "native":  # the stored values exactly
            assert errors[kind, "block32"] <= 0.01
            assert errors[kind, "block32"] <= errors[kind, "rowwise"]
        else:  # the tables dequantized to bfloat16 at load: that rounding is most of the error
            assert errors[kind, "block32"] <= 0.02


def test_8bit_tables_shrink_the_table_bytes_and_the_planner_counts_them(packed, tiny_models):
    """The default 8-bit bundle has 8-bit tables; what they save is what the planner says,
    and the planner's bytes are the manifest's with either kind of table."""
    from transformers import AutoConfig

    from edgepack.plan.model import describe_model
    from edgepack.plan.sizing import Quant, weight_bytes

    for kind in ("llama", "llama-untied"):
        wide, narrow = (edgepack.load(packed(kind, 8, **o)).manifest for o in ({"table_bits": 16}, {}))
        assert narrow["quantization"]["tables"]["scheme"] == "int8-block32"
        vocab, hidden = wide["tensors"]["model.embed_tokens.weight"]["shape"]
        tables = 1 if kind == "llama" else 2
        saved = 2 * vocab * hidden - (vocab * hidden + 2 * vocab * hidden // 32)  # codes + a float16 per 32
        assert wide["memory"]["weight_bytes"] - narrow["memory"]["weight_bytes"] == tables * saved
        desc = describe_model(AutoConfig.from_pretrained(tiny_models[kind]))
        assert weight_bytes(desc, Quant(8)) == narrow["memory"]["weight_bytes"]
        assert weight_bytes(desc, Quant(8, table_bits=8)) == narrow["memory"]["weight_bytes"]
        assert weight_bytes(desc, Quant(8, table_bits=16)) == wide["memory"]["weight_bytes"]
    int4 = edgepack.load(packed("llama", 4, quant_type="int4")).manifest
    assert int4["quantization"]["tables"]["scheme"] == "int8-block32"
    desc = describe_model(AutoConfig.from_pretrained(tiny_models["llama"]))
    assert weight_bytes(desc, Quant(4, "int4")) == int4["memory"]["weight_bytes"]
    assert "tables" not in edgepack.load(packed("llama", 16)).manifest["quantization"]  # 16-bit: 16-bit tables


def test_rows_not_whole_blocks_get_a_scale_per_row():
    from edgepack.export.quantize import table_scheme
    from edgepack.plan.sizing import table_bytes

    assert table_scheme([576, 576]) == "int8-block32" and table_scheme([576, 100]) == "int8-rowwise"
    assert table_bytes(10, 64) == 640 + 10 * 2 * 2 and table_bytes(10, 100) == 1000 + 10 * 4


def test_bundles_without_the_field_load_with_16bit_tables(packed):
    """Every bundle packed before quantization.tables existed has none: its tables are 16-bit."""
    lm = edgepack.load(packed("llama", 8, table_bits=16))
    assert "tables" not in lm.manifest["quantization"]
    assert lm.manifest["tensors"]["model.embed_tokens.weight"]["dtype"] == "BF16"
    assert lm.backend == "native"
    assert lm.generate("The capital", max_new_tokens=3, min_new_tokens=3, temperature=0)


def test_verify_refuses_a_damaged_scale_tensor(packed, tmp_path):
    """A byte of the block scales changed: verify's hash check refuses the bundle by file."""
    from edgepack.format import bundle as bundle_format

    bundle = tmp_path / "b"
    shutil.copytree(packed("llama-untied", 8), bundle)
    manifest = bundle_format.verify_bundle(bundle)
    info = manifest["tensors"]["lm_head.weight.scales"]
    shard = bundle / info["file"]
    data = bytearray(shard.read_bytes())
    header_bytes = 8 + int.from_bytes(data[:8], "little")
    start = json.loads(data[8:header_bytes])["lm_head.weight.scales"]["data_offsets"][0]
    data[header_bytes + start + 3] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=info["file"]):
        bundle_format.verify_bundle(bundle)


@pytest.mark.parametrize("edit,problem", [
    (lambda t: t.update(bits=4), "tables.bits must be 8"),
    (lambda t: t.update(scheme="nf4"), "tables.scheme"),
    (lambda t: t.update(modules=[]), "non-empty list"),
    (lambda t: t.update(modules=["model.nowhere"]), "no .weight and .weight.scales"),
    (lambda t: t.update(modules=["model.norm"]), "no .weight and .weight.scales"),
    (lambda t: t.update(scheme="int8-rowwise"), "no .weight and .SCB"),
])
def test_the_tables_field_is_validated(packed, edit, problem):
    good = edgepack.load(packed("llama", 8)).manifest
    manifest_format.validate_manifest(copy.deepcopy(good))
    bad = copy.deepcopy(good)
    edit(bad["quantization"]["tables"])
    with pytest.raises(ManifestError, match=problem):
        manifest_format.validate_manifest(bad)


@pytest.mark.parametrize("tensor,field,value", [
    ("model.embed_tokens.weight", "dtype", "BF16"),
    ("model.embed_tokens.weight.scales", "dtype", "F32"),
    ("model.embed_tokens.weight.scales", "shape", [8, 2]),
])
def test_a_table_stored_in_the_wrong_dtype_or_shape_is_refused(packed, tensor, field, value):
    bad = copy.deepcopy(edgepack.load(packed("llama", 8)).manifest)
    bad["tensors"][tensor][field] = value
    with pytest.raises(ManifestError, match="must be I8 .* with weight.scales F16"):
        manifest_format.validate_manifest(bad)
    bad["quantization"]["tables"] = "yes"
    with pytest.raises(ManifestError, match="tables must be an object"):
        manifest_format.validate_manifest(bad)


def test_unknown_table_bits_are_refused(tiny_models, tmp_path):
    from edgepack.export.pack import pack

    with pytest.raises(QuantizationError, match="table bits 4"):
        pack(str(tiny_models["llama"]), tmp_path / "out", bits=8, table_bits=4)
    assert not (tmp_path / "out").exists()


def test_inspect_names_the_8bit_tables(packed, rowwise):
    from edgepack.format.verify import describe

    shown = describe(edgepack.load(packed("llama-untied", 8)).manifest)
    assert "8-bit tables: model.embed_tokens, lm_head (int8-block32)" in shown
    assert "kept 16-bit:  lm_head" not in shown
    assert "(int8-rowwise)" in describe(edgepack.load(rowwise("llama-untied")).manifest)
    assert "8-bit tables" not in describe(edgepack.load(packed("llama-untied", 8, table_bits=16)).manifest)
