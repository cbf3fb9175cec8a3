"""The minimal runtime: loading, its numerics against bitsandbytes, generation, imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import edgepack
from edgepack.errors import GenerationError
from edgepack.runtime.torch.linear import Int4Linear, Int8Linear, Linear4bit

SETTINGS = [(16, {}), (8, {}), (4, {}), (4, {"quant_type": "int4"})]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-untied"])
@pytest.mark.parametrize("bits,opts", SETTINGS, ids=["16", "8", "4-nf4", "4-int4"])
def test_pack_verify_load_generate(packed, kind, bits, opts):
    lm = edgepack.load(packed(kind, bits, **opts), backend="torch")
    layers = [m for m in lm.model.modules() if isinstance(m, (Int8Linear, Linear4bit, Int4Linear))]
    # quantized weights: GPT-2 2 x (64*192 + 64*64 + 64*256 + 256*64); Llama 2 x (4 attention
    # projections 64*64 + 64*32 + 64*32 + 64*64, 3 MLP 64*128); the lean decoder fuses some
    quantized_weights = sum(m.in_features * m.out_features for m in layers)
    assert quantized_weights == (0 if bits == 16 else {"gpt2": 98304}.get(kind, 73728))
    assert not [n for n, p in lm.model.named_parameters() if p.device.type == "meta"]
    steps = list(lm.stream_steps("The capital of France", max_new_tokens=12, min_new_tokens=12, temperature=0))
    assert len(steps) == 12 and steps[-1].finish_reason == "length"
    assert "".join(s.text for s in steps) == lm.tokenizer.decode([s.token for s in steps], skip_special_tokens=True)
    out = lm.model(torch.tensor([[5, 6, 7]]))
    assert out.logits.shape == (1, 3, 400)


def test_no_full_precision_copy_of_quantized_layers(packed):
    lm = edgepack.load(packed("llama", 8), backend="torch")
    int8 = [m for m in lm.model.modules() if isinstance(m, Int8Linear)]
    assert int8 and all(m.weight.dtype == torch.int8 and m.SCB.dtype == torch.float32 for m in int8)
    lm4 = edgepack.load(packed("llama", 4), backend="torch")
    four = [m for m in lm4.model.modules() if isinstance(m, Linear4bit)]
    assert four and all(m.weight.dtype == torch.uint8 for m in four)
    assert all(m.weight.numel() == m.in_features * m.out_features // 2 for m in four)  # two codes per byte
    floats = {t.data_ptr(): t for t in lm4.model.state_dict().values() if t.is_floating_point() and t.numel() >= 64 * 128}
    assert [t.shape for t in floats.values()] == [torch.Size([400, 64])]  # only the tied embedding


def test_tied_lm_head_shares_the_embedding(packed):
    model = edgepack.load(packed("llama", 8), backend="torch").model
    assert model.lm_head.weight is model.embed
    untied = edgepack.load(packed("llama-untied", 8), backend="torch").model
    assert untied.lm_head.weight is not untied.embed


@pytest.mark.parametrize("kind", ["llama", "llama-untied"])
def test_head_runs_in_float16_with_the_stored_values(packed, kind):
    from safetensors.torch import load_file

    bundle = packed(kind, 8, table_bits=16)  # 16-bit tables: the default 8-bit ones are test_tables.py's
    model = edgepack.load(bundle, backend="torch").model
    stored = {}
    for f in sorted(bundle.glob("*.safetensors")):
        stored.update(load_file(f))
    head = stored.get("lm_head.weight", stored["model.embed_tokens.weight"])
    assert head.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float16
    # bfloat16 -> float16 is exact down to float16's normal range; below it (|w| < 2**-14)
    # float16 keeps steps of 2**-24
    for ours, theirs in ((model.lm_head.weight, head), (model.embed, stored["model.embed_tokens.weight"])):
        normal = theirs.float().abs() >= 2**-14
        assert torch.equal(ours.float()[normal], theirs.float()[normal])
        assert (ours.float() - theirs.float()).abs().max() <= 2**-25
    # tied: one buffer, converted in place; untied: the embedding table is left as stored
    assert (model.embed.data_ptr() == model.lm_head.weight.data_ptr()) == (kind == "llama")
    assert model.embed.dtype == (torch.float16 if kind == "llama" else torch.bfloat16)
    logits = model(torch.tensor([[5, 6, 7]])).logits
    x = model._hidden(torch.tensor([5, 6, 7]), None)
    normed = torch.nn.functional.rms_norm(x, (x.shape[-1],), model.norm, model.cfg.eps)
    expected = normed.double() @ head.double().T
    assert ((logits[0].double() - expected).abs().max() / expected.abs().max()) < 2e-3


def test_head_out_of_float16_range_stays_bfloat16(packed):
    from edgepack.runtime.torch import llama

    model = edgepack.load(packed("llama-untied", 8), backend="torch").model
    big = (torch.randn(8, model.cfg.hidden) * 0.05).to(torch.bfloat16)
    big[5, 1] = 2 * llama.FLOAT16_MAX
    model.lm_head.weight = torch.nn.Parameter(big.clone(), requires_grad=False)
    model._half_head()
    assert model.lm_head.weight.dtype == torch.bfloat16 and torch.equal(model.lm_head.weight, big)


def test_lean_decoder_matches_transformers(packed, monkeypatch):
    """The lean CPU decoder computes what transformers' Llama computes on the same tensors."""
    from edgepack.runtime.torch.llama import LeanLM

    for bits, opts in SETTINGS:
        bundle = packed("llama-untied", bits, **opts)
        lean = edgepack.load(bundle, backend="torch")
        monkeypatch.setenv("EDGEPACK_LEAN", "0")
        hf = edgepack.load(bundle, backend="torch")
        monkeypatch.delenv("EDGEPACK_LEAN")
        assert isinstance(lean.model, LeanLM) and not isinstance(hf.model, LeanLM)
        ids = torch.tensor([lean.tokenizer.encode("The capital of France is Paris and")])
        a, b = lean.model(ids).logits.float(), hf.model(ids).logits.float()
        assert (a - b).norm() / b.norm() < 0.03, bits
        # lean keeps activations in fp32, transformers in bf16: greedy paths of a random
        # model may part after a near-tie, but the next-token choices agree
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


def test_lean_kv_cache_matches_full_recompute(packed):
    lm = edgepack.load(packed("llama", 16), backend="torch")
    ids = torch.tensor([lm.tokenizer.encode("Water boils at one hundred degrees")])
    full = lm.model(ids).logits[0].float()
    cache = lm.model.new_cache(64)
    first = lm.model.logits_last(ids[:, :4], cache).float()
    chunk = lm.model(ids[:, 4:-1], cache).logits[0].float()  # a chunk after a prefix: masked
    last = lm.model.logits_last(ids[:, -1:], cache).float()
    # bf16 attention: equal up to bf16 rounding; a wrong mask or offset is off by far more
    assert torch.allclose(first, full[3], atol=5e-2)
    assert torch.allclose(chunk, full[4:-1], atol=5e-2)
    assert torch.allclose(last, full[-1], atol=5e-2)
    assert cache.length == ids.shape[1]


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_4bit_dequantization_matches_bitsandbytes_bit_for_bit(quant_type, double_quant):
    import bitsandbytes.functional as F

    from edgepack.runtime.torch.linear import dequantize_4bit

    torch.manual_seed(0)
    for shape in [(96, 64), (33, 70)]:  # the second leaves a partial last block
        w = torch.randn(*shape, dtype=torch.bfloat16)
        packed_w, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
        layer = Linear4bit(shape[1], shape[0], False, torch.bfloat16, 64)
        layer.attach({"weight": packed_w, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}})
        ours = layer.dequantized_weight().to(torch.bfloat16)
        assert torch.equal(ours, F.dequantize_4bit(packed_w, state))
        assert dequantize_4bit(packed_w, state.code, layer._absmax, 64, shape).shape == shape


def test_int4_linear_runs_the_stored_formula():
    """torch's int4 kernel (after the load-time repack) computes x @ W.T for W written out
    from the stored codes, scales and zeros; fused projections equal the separate ones."""
    from edgepack.runtime.torch.llama import fuse
    from edgepack.export.quantize import quantize_int4

    torch.manual_seed(0)
    x = torch.randn(5, 128)
    parts, weights = [], []
    for out_f in (64, 32, 96):
        w = torch.randn(out_f, 128) * 0.1
        stored = quantize_int4(w, 32, torch.float32)
        codes = torch.stack((stored["weight"] & 15, stored["weight"] >> 4), -1).reshape(out_f, 128).float()
        sz = stored["weight.scales_and_zeros"].repeat_interleave(32, dim=0)  # [in, out, 2]
        written = (codes - 8) * sz[..., 0].T + sz[..., 1].T
        assert (written - w).abs().max() <= sz[..., 0].max() / 2 + 1e-6  # within half a step of the source
        layer = Int4Linear(128, out_f, False, torch.float32, 32)
        layer.attach(stored)
        assert torch.equal(layer.dequantized_weight(), written)  # before the repack: the stored formula
        assert torch.allclose(layer(x), x @ written.T, rtol=1e-5, atol=1e-5)
        assert layer.weight.device.type == "meta"  # the stored codes were dropped after the repack
        assert torch.allclose(layer.dequantized_weight(), written, atol=1e-6)
        fresh = Int4Linear(128, out_f, False, torch.float32, 32)
        fresh.attach(stored)
        parts.append(fresh)
        weights.append(written)
    fused = fuse(parts)
    assert isinstance(fused, Int4Linear) and fused.out_features == 192
    assert torch.allclose(fused(x), x @ torch.cat(weights).T, rtol=1e-5, atol=1e-5)


def test_int4_refuses_shapes_the_kernel_cannot_run():
    layer = Int4Linear(128, 40, False, torch.float32, 32)  # 40 rows: not a multiple of 16
    with pytest.raises(ValueError, match="cannot run int4"):
        layer.attach({"weight": torch.zeros(40, 64, dtype=torch.uint8),
                      "weight.scales_and_zeros": torch.zeros(4, 40, 2)})


def test_int8_linear_is_weight_only():
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(3, 64)
    cb, scb, _ = F.int8_vectorwise_quant(w)
    layer = Int8Linear(64, 48, False, torch.float32)
    layer.attach({"weight": cb, "SCB": scb})
    expected = x @ (cb.float() * scb[:, None] / 127).T
    assert torch.allclose(layer(x), expected, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 7, 8, 300])
def test_int8_kernel_prompt_path_computes_the_stored_formula(rows, monkeypatch):
    """From INT8_WIDE_ROWS rows the int8 kernel runs int8 x int8 GEMMs on two-digit
    activations in chunks of weight rows (a ragged last one included); below it, torch's
    int8pack kernel. Both compute W = weight * SCB/127."""
    from edgepack.runtime.torch import linear

    monkeypatch.setattr(linear, "INT8_WIDE_CHUNK", 2 * 300 * 20)  # 300 rows: chunks of 20, 20, 8 weight rows
    torch.manual_seed(0)
    cb = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    scb = torch.rand(48) * 3
    layer = Int8Linear(64, 48, False, torch.bfloat16)
    layer.attach({"weight": cb, "SCB": scb})
    x = torch.randn(rows, 64).bfloat16()
    expected = x.double() @ (cb.double() * scb.double()[:, None] / 127).T
    y = layer.cpu_kernel()(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 48)
    err = ((y.double() - expected).norm() / expected.norm()).item()
    if rows >= linear.INT8_WIDE_ROWS:  # ~15-bit inputs, float32 scales: the output's bf16 rounding
        assert err < 3e-3
    else:
        assert err < 1e-2


@pytest.mark.parametrize("inputs,digits", [(256, 2), (128 * 128, 3)])
def test_int8_digit_activations_are_as_precise_as_bf16_inputs(inputs, digits, monkeypatch):
    """Rows with a massive outlier channel, as LLMs have: one int8 digit per activation (W8A8)
    loses the small values; the digits keep the result as close as bf16 inputs would (the
    decode kernel's), with a third digit for very wide layers."""
    from edgepack.runtime.torch import linear

    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape[0]) or real(a, b))
    torch.manual_seed(1)
    x = torch.randn(16, inputs)
    x[:, 7] = 40.0 * inputs**0.5 * (1 + torch.rand(16))  # one channel holding most of the row's norm
    keep = x.clone()
    weight = torch.randint(-127, 128, (32, inputs), dtype=torch.int8)
    scales = torch.rand(32) * 0.01
    w = weight.double() * scales.double()[:, None]
    expected = x.double() @ w.T
    y = linear.int8_wide_matmul(x, weight, scales)
    assert y.dtype == torch.float32 and calls == [digits * 16]
    assert torch.equal(x, keep)  # the input is not modified

    def err(out):
        return ((out.double() - expected).norm() / expected.norm()).item()

    s = x.abs().amax(1, keepdim=True) / 127
    one_digit = ((x / s).round() * s).double() @ w.T
    assert err(y) <= 1.05 * err(x.bfloat16().double() @ w.T)
    assert err(one_digit) > 20 * err(y)


def test_16bit_linear_prompt_path_matches_bf16_linear():
    from edgepack.runtime.torch.llama import CastLinear

    torch.manual_seed(0)
    layer = CastLinear(64, 40, bias=True, dtype=torch.bfloat16)
    layer.weight = torch.nn.Parameter(torch.randn(40, 64).bfloat16(), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(40).bfloat16(), requires_grad=False)
    x = torch.randn(100, 64)
    expected = x.bfloat16().double() @ layer.weight.double().T + layer.bias.double()
    from edgepack.runtime.torch import linear

    linear._wide_buffer = torch.empty(0)
    with torch.inference_mode():  # the buffer made in inference mode (a model's forward) ...
        layer(torch.randn(300, 64))
    y = layer(x)  # ... is still writable outside it
    assert y.dtype == torch.bfloat16
    assert ((y.double() - expected).norm() / expected.norm()).item() < 5e-3
    assert torch.allclose(layer(x[:4]).double(), y[:4].double(), rtol=2e-2, atol=2e-2)  # the 4-row (bf16) path agrees


@pytest.mark.parametrize("bits", [8, 16])
def test_lean_load_reads_fused_rows_in_place(packed, bits, monkeypatch):
    """q/k/v and gate/up are read straight into the fused buffers Block runs: no copy at load
    (and garbage collection is back on afterwards)."""
    import gc

    from edgepack.runtime.torch import llama

    made = {}
    real = llama.fused_destinations
    monkeypatch.setattr(llama, "fused_destinations", lambda skeleton: made.setdefault("d", real(skeleton)))
    lm = edgepack.load(packed("llama", bits), backend="torch")
    assert gc.isenabled()
    dest = made["d"]
    assert len(dest) == (2 if bits == 8 else 1) * 5 * len(lm.model.blocks)
    for i, block in enumerate(lm.model.blocks):
        qkv, gate_up = block.qkv_proj.weight, block.gate_up_proj.weight
        assert qkv.data_ptr() == dest[f"model.layers.{i}.self_attn.q_proj.weight"].data_ptr()
        assert gate_up.data_ptr() == dest[f"model.layers.{i}.mlp.gate_proj.weight"].data_ptr()
        assert qkv.untyped_storage().nbytes() == qkv.nbytes  # the buffer is exactly the fused rows
    # ... and it computes what the stored (unfused) tensors compute
    from safetensors.torch import load_file

    stored = {}
    for f in sorted(packed("llama", bits).glob("*.safetensors")):
        stored.update(load_file(f))
    q = "model.layers.1.self_attn."
    rows = [stored[q + n + ".weight"] for n in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(lm.model.blocks[1].qkv_proj.weight, torch.cat(rows))


def test_joined_copies_only_when_it_must():
    from edgepack.runtime.torch.llama import joined

    buffer = torch.arange(12.0).view(6, 2)
    whole = joined([buffer[:1], buffer[1:4], buffer[4:]])
    assert whole.data_ptr() == buffer.data_ptr() and torch.equal(whole, buffer)
    apart = joined([buffer[:1], buffer[2:4]])  # a gap: concatenated into a new tensor
    assert apart.data_ptr() != buffer.data_ptr() and torch.equal(apart, buffer[[0, 2, 3]])
    swapped = joined([buffer[3:], buffer[:3]])
    assert torch.equal(swapped, torch.cat([buffer[3:], buffer[:3]]))


def test_logits_match_the_exporters_reference(packed):
    """The exporter checked this at pack time; the runtime agrees again on a new prompt."""
    from transformers import AutoModelForCausalLM

    bundle = packed("llama", 8, table_bits=16)  # plain transformers reads 16-bit tables only
    lm = edgepack.load(bundle, backend="torch")
    ref = AutoModelForCausalLM.from_pretrained(str(bundle))  # transformers + bitsandbytes on the same files
    ids = torch.tensor([lm.tokenizer.encode("Small boxes run small models")])
    with torch.no_grad():
        a, b = lm.model(ids).logits.float(), ref(ids).logits.float()
    assert (a - b).norm() / b.norm() < 0.05


def test_stream_yields_one_piece_per_token_and_matches_generate(packed):
    lm = edgepack.load(packed("llama", 8))
    steps = list(lm.stream_steps("The capital", max_new_tokens=10, min_new_tokens=10, temperature=0))
    assert len(steps) == 10 and steps[-1].finish_reason == "length"
    assert [s.generated_tokens for s in steps] == list(range(1, 11))
    pieces = list(lm.stream("The capital", max_new_tokens=10, min_new_tokens=10, temperature=0))
    assert len(pieces) == 10
    assert "".join(pieces) == lm.generate("The capital", max_new_tokens=10, min_new_tokens=10, temperature=0)
    assert "".join(pieces) == lm.tokenizer.decode([s.token for s in steps], skip_special_tokens=True)


def test_greedy_matches_transformers_generate_on_16bit(packed):
    from transformers import AutoModelForCausalLM

    bundle = packed("gpt2", 16)
    lm = edgepack.load(bundle)
    ref = AutoModelForCausalLM.from_pretrained(str(bundle), dtype=torch.bfloat16)
    ids = lm.tokenizer.encode("The quick brown fox")
    out = ref.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    ours = [s.token for s in lm.stream_steps("The quick brown fox", max_new_tokens=8, min_new_tokens=8, temperature=0)]
    assert ours == out[0, len(ids) :].tolist()


def test_min_new_tokens_suppresses_eos_native(packed, monkeypatch):
    lm = edgepack.load(packed("llama", 8))
    assert lm.backend == "native"
    eos = next(iter(lm.eos_token_ids))
    forward = lm.model.forward

    def eos_first(tokens, cache):  # make EOS the model's favourite token
        logits = forward(tokens, cache)
        logits[eos] = 1e4
        return logits

    monkeypatch.setattr(lm.model, "forward", eos_first)
    first = list(lm.stream_steps("The", max_new_tokens=5, temperature=0))
    forced = list(lm.stream_steps("The", max_new_tokens=5, min_new_tokens=5, temperature=0))
    assert len(first) == 1 and first[0].finish_reason == "stop"
    assert len(forced) == 5 and eos not in [s.token for s in forced]


def test_min_new_tokens_suppresses_eos(packed):
    lm = edgepack.load(packed("llama", 8), backend="torch")
    eos = next(iter(lm.eos_token_ids))
    # make EOS the model's favourite token: without min_new_tokens it stops at once
    lm.model.lm_head.weight.data[eos] = lm.model.lm_head.weight.data.abs().max() * 5  # tied: the embedding too
    first = list(lm.stream_steps("The", max_new_tokens=5, temperature=0))
    forced = list(lm.stream_steps("The", max_new_tokens=5, min_new_tokens=5, temperature=0))
    assert len(forced) == 5 and eos not in [s.token for s in forced]
    assert len(first) <= len(forced)


def test_sampling_is_reproducible_with_seed(packed):
    lm = edgepack.load(packed("llama", 8))
    kw = dict(max_new_tokens=12, min_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50)
    assert lm.generate("The", seed=3, **kw) == lm.generate("The", seed=3, **kw)
    assert len({lm.generate("The", seed=s, **kw) for s in range(6)}) > 1


def test_stop_strings_cut_the_text(packed):
    lm = edgepack.load(packed("llama", 16))
    full = lm.generate("The", max_new_tokens=20, min_new_tokens=20, temperature=0)
    stop = full[3:5]
    cut = lm.generate("The", max_new_tokens=20, min_new_tokens=20, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_stop_string_text_is_held_back_until_it_cannot_be_a_stop(packed):
    lm = edgepack.load(packed("llama", 16))
    kw = dict(max_new_tokens=20, min_new_tokens=20, temperature=0)
    full = lm.generate("The", **kw)
    stop = full[4:7] + "\x00never"  # a stop string whose start appears but which never completes
    pieces = list(lm.stream("The", stop=[stop], **kw))
    assert "".join(pieces) == full  # everything comes out in the end
    assert len(pieces) == 20


def test_partial_stop_length():
    from edgepack.runtime import _partial_stop_length

    assert _partial_stop_length("hello wor", ["world"]) == 3
    assert _partial_stop_length("hello", ["world"]) == 0
    assert _partial_stop_length("ab", ["b!", "ab!"]) == 2


def test_chat_prompt_uses_the_template(packed):
    lm = edgepack.load(packed("llama", 8))
    ids = lm.encode_prompt([{"role": "user", "content": "hi"}])
    assert lm.tokenizer.decode(ids) == "<|user|>hi</s><|assistant|>"
    assert lm.encode_prompt("hi", chat=True) == ids


@pytest.mark.parametrize(
    "kwargs,text",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"max_new_tokens": 2, "min_new_tokens": 3}, "min_new_tokens"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0}, "top_p must be in"),
        ({"top_k": -2}, "top_k must be >= 0"),
    ],
)
def test_bad_sampling_arguments(packed, kwargs, text):
    lm = edgepack.load(packed("llama", 8))
    with pytest.raises(GenerationError, match=text):
        lm.generate("The", **kwargs)


def test_multibyte_characters_are_never_split(packed):
    lm = edgepack.load(packed("gpt2", 16))
    text = "naïve café 東京 🚀"
    ids = lm.tokenizer.encode(text)
    from edgepack.runtime import _IncrementalDetokenizer

    detok = _IncrementalDetokenizer(lm.tokenizer)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_hashes_checked_once_then_trusted_until_a_file_changes(bundle_copy, monkeypatch):
    from edgepack.format import bundle as bundle_format

    bundle = bundle_copy("llama", 8)
    calls = []
    real = bundle_format.sha256_file
    monkeypatch.setattr(bundle_format, "sha256_file", lambda p: calls.append(p) or real(p))
    edgepack.load(bundle)
    first = len(calls)
    edgepack.load(bundle)
    assert first == len(bundle_format.read_manifest(bundle)["files"]) and len(calls) == first
    (bundle / "config.json").touch()  # a new mtime: hash everything again
    edgepack.load(bundle)
    assert len(calls) == 2 * first
    monkeypatch.setenv("EDGEPACK_SKIP_HASH", "1")
    (bundle / "config.json").touch()
    edgepack.load(bundle)
    assert len(calls) == 2 * first


# What loading and generating may import: the runtime, the bundle format and the errors;
# never export/, plan/, hub/, serve/ or cli/ (checked by prefix, so new modules count too).
RUNTIME_PREFIXES = ("edgepack.runtime", "edgepack.format")
RUNTIME_ROOT_MODULES = {"edgepack", "edgepack.errors", "edgepack.extras"}  # extras: which optional packages are installed


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_runtime_imports_nothing_from_exporter_planner_or_hub(packed, kind):
    bundle = packed(kind, 8)
    code = (
        "import sys, json, edgepack.runtime as r\n"
        f"lm = r.load({str(bundle)!r})\n"
        "lm.generate('The', max_new_tokens=3)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('edgepack', 'bitsandbytes', 'transformers', 'torch'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    ours = {m for m in loaded if m.startswith("edgepack")}
    outside = {m for m in ours if m not in RUNTIME_ROOT_MODULES and not m.startswith(RUNTIME_PREFIXES)}
    assert not outside, outside
    assert not any(m.startswith("bitsandbytes") for m in loaded)
    # Llama-family models on CPU run in edgepack's own engine: not even torch is imported;
    # GPT-2 is a transformers model
    assert any(m.startswith("transformers") for m in loaded) == (kind == "gpt2")
    assert ("torch" in loaded) == (kind == "gpt2")
    assert any(m.startswith("edgepack.runtime.torch") for m in ours) == (kind == "gpt2")


def test_import_edgepack_is_cheap():
    code = "import sys, edgepack; print(int('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_4bit_forward_in_row_chunks_matches_whole_matrix(monkeypatch):
    import bitsandbytes.functional as F

    from edgepack.runtime.torch import linear

    torch.manual_seed(0)
    w, x = torch.randn(96, 128, dtype=torch.bfloat16), torch.randn(3, 128)
    packed_w, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    layer = Linear4bit(128, 96, False, torch.float32, 64)
    layer.attach({"weight": packed_w, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}})
    whole = layer(x)
    monkeypatch.setattr(linear, "DEQUANT_CHUNK_WEIGHTS", 128 * 5)  # 5 rows a chunk, last one partial
    assert torch.allclose(layer(x), whole, rtol=1e-5, atol=1e-4)  # same weights, per-chunk matmuls
    ref = x @ F.dequantize_4bit(packed_w, state).float().T  # bnb rounds the weights to bf16; we keep fp32
    assert (whole - ref).norm() / ref.norm() < 5e-3


def test_verified_once_record_notices_an_edit_with_its_mtime_put_back(bundle_copy):
    """Size, mtime and inode can all be kept by an in-place edit (`touch -d` sets mtime back);
    the inode change time cannot be set by a user, so the record keys on it too."""
    from edgepack.errors import BundleIntegrityError

    bundle = bundle_copy("llama", 8)
    edgepack.load(bundle)  # hashed once; the record now trusts these files
    shard = bundle / "model.safetensors"
    before = shard.stat()
    with open(shard, "r+b") as f:  # same inode, same size
        f.seek(before.st_size - 7)
        byte = f.read(1)
        f.seek(before.st_size - 7)
        f.write(bytes([byte[0] ^ 0x40]))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    with pytest.raises(BundleIntegrityError, match="model.safetensors does not match its sha256"):
        edgepack.load(bundle)
