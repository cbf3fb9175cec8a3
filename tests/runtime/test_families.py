"""Each family of issue 17's table, packed at 16, 8 and int4 bits, loaded by edgepack's runtime
and compared with transformers' float32 forward of the source: the prompt pass and greedy
decode steps through the KV cache, at a length past the sliding window. ``lm.backend`` says
which backend ran each case (the CPU engine where native.supports allows, else torch)."""

from __future__ import annotations

import pytest
import torch

from tiny import make_tokenizer
from families import FAMILIES, SLIDING_WINDOW, make_family_model

PROMPT = "Quantization stores weights in eight or four bits instead of sixteen. The capital of Italy is Rome."
DECODE_STEPS = 6
# Relative L2 error of the last-token logits against transformers' float32 forward of the
# source, per packing. 16 bits: bf16 rounding of weights and activations. 8 bits: per-row int8.
# int4 (groups of 32): 16 levels per group of these random, unclustered weights are ~8% error
# per matrix, compounded over 2-6 layers to 0.1-0.4 (measured); that bound is loose, so int4
# leans on the next check.
RTOL = {16: 0.02, 8: 0.08, 4: 0.45}
# The torch backend runs transformers in bfloat16. transformers' own bf16 forward of the
# 6-layer Gemma 3 (sandwich norms) is 0.017 mean, up to 0.026, off its float32 forward with
# the same bf16-rounded weights (measured), so there 16 bits is held to 0.03.
TORCH_RTOL_16 = {"gemma3": 0.03}
# ... and against transformers' float32 forward over the bundle's own (dequantized) weights:
# what is left is the runtime's arithmetic (bf16 activations on the torch backend, as above).
RTOL_OWN_WEIGHTS = 0.03
# A top-1 choice counts where the reference's lead over its runner-up is more than this many
# times the per-logit error its bound allows (tolerance x rms of the logits); a smaller lead is
# a near-tie that an error within the bound may flip.
DECISIVE_LEAD = 4.0
# 16-bit tables: own_weights_model rebuilds transformers' model from the stored tensors
# (8-bit tables: tests/runtime/engine/test_tables.py, tests/bench/real_gemma3.py)
PACKINGS = {16: {}, 8: {"table_bits": 16}, 4: {"quant_type": "int4", "table_bits": 16}}
# The families edgepack's CPU engine runs (where its C module is usable on this box); the rest
# load through torch.
ENGINE_FAMILIES = ("llama3", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi4-mini", "smollm3", "mistral-sw")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (local model directory, the float32 model it holds)."""
    root = tmp_path_factory.mktemp("family-models")
    tokenizer = make_tokenizer()
    out = {}
    for family in FAMILIES:
        model = make_family_model(family, len(tokenizer))
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = (root / family, model)
    return out


@pytest.fixture(scope="module")
def family_bundle(sources, tmp_path_factory):
    """bundle(family, bits) -> bundle dir, packed once per module."""
    from edgepack.export.pack import pack

    root, done = tmp_path_factory.mktemp("family-bundles"), {}

    def get(family: str, bits: int):
        if (family, bits) not in done:
            out = root / f"{family}-{bits}"
            pack(str(sources[family][0]), out, bits=bits, **PACKINGS[bits])
            done[family, bits] = out
        return done[family, bits]

    return get


def _stepper(lm, max_tokens: int):
    """step(token ids) -> float32 logits of the last one, each call continuing the cache."""
    model = lm.model
    if lm.backend == "native":
        cache = model.new_cache(max_tokens)
        return lambda ids: torch.frombuffer(bytearray(model.forward(ids, cache)), dtype=torch.float32)
    from edgepack.runtime.torch.model import _hf_step, _lean_step

    step = _lean_step(model, max_tokens) if hasattr(model, "logits_last") else _hf_step(model)
    return lambda ids: step(torch.tensor([ids])).float()


def own_weights_model(lm):
    """transformers' float32 model over the bundle's stored tensors, each quantized layer
    dequantized (the exporter's reference, reference.dequantized_model)."""
    from transformers import AutoConfig

    from edgepack.export import reference
    from edgepack.export.quantize import Result, Settings
    from edgepack.runtime.torch.model import read_shard

    q = lm.manifest["quantization"]
    config = AutoConfig.from_pretrained(str(lm.path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tensors = {}
    for rel in sorted({info["file"] for info in lm.manifest["tensors"].values()}):
        tensors.update(read_shard(lm.path / rel, lm.manifest, rel))
    settings = Settings(q["bits"], q.get("quant_type", "nf4"), q.get("double_quant", False), q.get("blocksize", 64))
    return reference.dequantized_model(config, Result(tensors, q["quantized_modules"]), settings)


def compare(lm, references: dict, prompt_ids: list[int], steps: int = DECODE_STEPS) -> dict:
    """Prompt pass, then ``steps`` greedy decode steps through the runtime's cache (the first
    reference's choice of token fed to all), each step's last-token logits against each
    reference model's full forward of the sequence. ``references``: name -> (model, rtol).
    Per reference: the worst relative L2 error of the prompt and of the decode steps, and top-1
    agreements out of the positions where the reference's choice is decisive."""
    step = _stepper(lm, len(prompt_ids) + steps)
    ids, rows = list(prompt_ids), {name: [] for name in references}
    got = step(ids)
    for n in range(steps + 1):
        for name, (model, rtol) in references.items():
            with torch.no_grad():
                want = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            top2 = want.topk(2).values
            decisive = float(top2[0] - top2[1]) > DECISIVE_LEAD * rtol * float(want.pow(2).mean().sqrt())
            rows[name].append((float((got - want).norm() / want.norm()), decisive, int(got.argmax()) == int(want.argmax())))
            if n < steps and name == next(iter(references)):
                next_token = int(want.argmax())
        if n < steps:
            ids.append(next_token)
            got = step([next_token])
    out = {"backend": lm.backend, "tokens": len(ids)}
    for name, row in rows.items():
        out[name] = {"prompt_rel": row[0][0], "decode_rel": max(r[0] for r in row[1:]),
                     "top1": (sum(d and same for _e, d, same in row), sum(d for _e, d, _s in row))}
    return out


# 8 bits calibrates (smoothing and GPTQ on the Llama-like families: ~4x a 16-bit pack), so
# those cases run in the slow tier; 16 bits and int4 cover every family in the fast one.
@pytest.mark.parametrize("bits", [16, pytest.param(8, marks=pytest.mark.slow), 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(family, bits, sources, family_bundle, record_property):
    from edgepack import runtime
    from edgepack.runtime import engine as native

    source = sources[family][1]
    lm = runtime.load(family_bundle(family, bits), device="cpu", force=True)
    prompt_ids = lm.tokenizer.encode(PROMPT)
    assert len(prompt_ids) > 2 * SLIDING_WINDOW
    rtol = TORCH_RTOL_16.get(family, RTOL[bits]) if bits == 16 and lm.backend == "torch" else RTOL[bits]
    got = compare(lm, {"source": (source, rtol), "own": (own_weights_model(lm), RTOL_OWN_WEIGHTS)}, prompt_ids)
    for name, rtol in (("source", rtol), ("own", RTOL_OWN_WEIGHTS)):
        assert got[name]["prompt_rel"] <= rtol and got[name]["decode_rel"] <= rtol, (name, got)
        matched, decisive = got[name]["top1"]
        assert matched == decisive, (name, got)
    assert got["own"]["top1"][1] >= (DECODE_STEPS + 1) // 2, got  # the top-1 check is not vacuous
    assert (lm.backend == "native") == (lm.why_not_native is None), (lm.backend, lm.why_not_native)
    if family in ENGINE_FAMILIES and native.c_module_unavailable() is None:
        assert lm.backend == "native", lm.why_not_native
    record_property("backend", lm.backend)  # in --junitxml; the engine is to take these over
    record_property("why_not_native", lm.why_not_native)
    record_property("rel_error_vs_source", [round(got["source"]["prompt_rel"], 4), round(got["source"]["decode_rel"], 4)])


def test_sliding_window_layers_of_any_llama_like_type():
    """Qwen2 with use_sliding_window marks its upper layers in layer_types: the engine gives
    those layers a window (and only those); lean.py, which attends over the whole cache, must
    leave the bundle to transformers."""
    from transformers import Qwen2Config

    from edgepack.runtime import engine as native
    from edgepack.runtime.engine.family import features

    config = Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1)
    assert native.supports(config.to_dict()) == "sliding-window attention"
    found = features(config.to_dict())
    assert found.layer_sliding == [False, True, True] and found.window == SLIDING_WINDOW
    assert native.supports(Qwen2Config(num_hidden_layers=3).to_dict()) is None
    assert features(Qwen2Config(num_hidden_layers=3).to_dict()).plain


def test_run_stats_and_inspect_say_which_backend_and_why(family_bundle, packed, capsys):
    """Where the engine cannot run a bundle, `run --stats` and `inspect` say so in one line,
    with the reason and the backend that runs instead; where it can, inspect says native."""
    from edgepack.runtime import engine as native
    from edgepack.cli import main

    gpt2, qwen2 = packed("gpt2", 16), family_bundle("qwen2", 16)
    assert main(["run", str(gpt2), "The capital", "--max-new-tokens", "2", "--stats", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "backend: torch, not edgepack's CPU engine: model_type 'gpt2'\n" in err
    assert main(["inspect", str(gpt2)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("backend:")]
    assert lines == ["backend:       torch; edgepack's CPU engine cannot run it: model_type 'gpt2'"]
    if native.c_module_unavailable() is None:  # else the C module is not built or not usable here
        assert main(["inspect", str(qwen2)]) == 0
        assert "backend:       native (edgepack's CPU engine)\n" in capsys.readouterr().out
        assert main(["run", str(qwen2), "The capital", "--max-new-tokens", "2", "--stats"]) == 0
        assert "backend: torch" not in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gemma3", "mistral-sw"])
def test_sliding_window_cache_across_chunks_and_calls(family, sources, family_bundle):
    """A sliding-window layer keeps only its window (a ring of SLIDING_WINDOW positions); its
    keys stay right past a prompt chunk's end (the engine runs 96 tokens a pass) and between
    calls that split the same tokens differently: prompt pieces, then decode steps."""
    from edgepack import runtime
    from edgepack.runtime import engine as native

    if native.c_module_unavailable() is not None:
        pytest.skip(f"edgepack's CPU engine is not usable here: {native.c_module_unavailable()}")
    lm = runtime.load(family_bundle(family, 16), device="cpu", force=True)
    model, source = lm.model, sources[family][1]
    ids = torch.randint(3, model.vocab, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    assert len(ids) > native._native.PROMPT_CHUNK
    with torch.no_grad():
        want = source(input_ids=torch.tensor([ids])).logits[0, -1]
    for parts in ([120], [5, 91, 20, 1, 1, 1, 1]):
        cache, at = model.new_cache(len(ids)), 0
        for n in parts:
            got = torch.frombuffer(bytearray(model.forward(ids[at : at + n], cache)), dtype=torch.float32)
            at += n
        assert float((got - want).norm() / want.norm()) <= RTOL[16], parts
    sliding = sum(model._features.layer_sliding)
    assert sliding == (5 if family == "gemma3" else 2)
    full_bytes = 2 * 2 * model.kv_heads * model.head_dim * len(ids)  # keys and values, bfloat16
    assert len(cache.memory) == (model.layers - sliding) * full_bytes + sliding * full_bytes * SLIDING_WINDOW // len(ids)


def _hf_calls(model, ids: list[int], parts: list[int]) -> list[torch.Tensor]:
    """transformers' logits of the last token of each call, the calls splitting ``ids`` as
    ``parts`` says and sharing one cache (as its generate() runs a prompt, then steps)."""
    from transformers import DynamicCache

    cache, at, out = DynamicCache(config=model.config), 0, []
    with torch.no_grad():
        for n in parts:
            out.append(model(input_ids=torch.tensor([ids[at : at + n]]), cache=cache, use_cache=True).logits[0, -1])
            at += n
    return out


@pytest.mark.parametrize("family", ["phi3", "phi4-mini"])
def test_longrope_switches_to_long_factors_where_transformers_does(family, sources, family_bundle):
    """longrope rotates a call's tokens with the short factors while the call ends before
    original_max_position_embeddings (64 here), with the long ones from there on, as
    transformers picks them by the length it is given; keys already cached keep theirs. A
    prompt past 64 matches transformers' full forward; a prompt and steps that cross 64 match
    its cached calls split the same way, which differ from the full forward past 64."""
    from edgepack import runtime
    from edgepack.runtime import engine as native
    from families import ORIGINAL_MAX

    if native.c_module_unavailable() is not None:
        pytest.skip(f"edgepack's CPU engine is not usable here: {native.c_module_unavailable()}")
    lm = runtime.load(family_bundle(family, 16), device="cpu", force=True)
    assert lm.backend == "native" and lm.model._features.long_from == ORIGINAL_MAX
    model, source = lm.model, sources[family][1]
    ids = torch.randint(3, model.vocab, (76,), generator=torch.Generator().manual_seed(2)).tolist()
    rel = lambda got, want: float((got - want).norm() / want.norm())  # noqa: E731
    for parts in ([70, 1, 1, 1, 1, 1, 1], [60, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 10], [40, 30, 1, 5]):
        cache, at = model.new_cache(len(ids)), 0
        wants = _hf_calls(source, ids, parts)
        for n, want in zip(parts, wants):
            got = torch.frombuffer(bytearray(model.forward(ids[at : at + n], cache)), dtype=torch.float32)
            at += n
            assert rel(got, want) <= RTOL[16], (parts, at)
            with torch.no_grad():
                full = source(input_ids=torch.tensor([ids[:at]])).logits[0, -1]
            if parts[0] > ORIGINAL_MAX or at <= ORIGINAL_MAX:  # one set of factors for every key
                assert rel(got, full) <= RTOL[16], (parts, at)
            elif at > ORIGINAL_MAX + 1 and not model.sliding:  # (a window of 8 soon drops the short keys)
                # keys of both sets: the full forward rotates all with the long ones
                assert rel(want, full) > 4 * RTOL[16], (parts, at, rel(want, full))


def test_phi_configs_as_released_read_like_transformers_reads_them():
    """Phi-4-mini's and Phi-3-mini's config.json as released (rope_scaling of type longrope
    without a factor, partial_rotary_factor and original_max_position_embeddings at the top
    level; Phi-3-mini-4k: no scaling, a window of 2047) give the engine the tables, attention
    factor and switch that transformers computes from them."""
    import copy
    import math

    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from edgepack.runtime.engine.family import features

    short, long = [1.0 + i / 8 for i in range(48)], [1.0 + i for i in range(48)]
    phi4_mini = {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 24, "num_key_value_heads": 8,
                 "num_hidden_layers": 32, "intermediate_size": 8192, "vocab_size": 200064, "hidden_act": "silu",
                 "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
                 "partial_rotary_factor": 0.75, "sliding_window": 262144, "tie_word_embeddings": True,
                 "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": long}}
    found = features(phi4_mini)
    assert not isinstance(found, str), found
    assert found.rot_dim == 96 and found.long_from == 4096 and found.window == 262144
    assert found.rope_mult == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    # torch's float32 pow rounds an odd value of theta^(2i / 96) 1 ulp away from the correctly
    # rounded one family.py takes (1e-7 of an angle: far below bf16 keys' 4e-3)
    same = lambda table: pytest.approx(table, rel=2.4e-7, abs=0)  # noqa: E731
    rotary = Phi3RotaryEmbedding(Phi3Config(**copy.deepcopy(phi4_mini)))  # it edits rope_scaling in place
    assert rotary.inv_freq.tolist() == same(found.inv_freq[0]) and rotary.attention_scaling == found.rope_mult
    rotary(torch.zeros(1), torch.tensor([[4096]]))  # a sequence of 4097: transformers switches to the long factors
    assert rotary.inv_freq.tolist() == same(found.long_inv_freq[0])

    phi3_4k = {**phi4_mini, "hidden_size": 3072, "num_attention_heads": 32, "max_position_embeddings": 4096,
               "sliding_window": 2047, "rope_scaling": None, "partial_rotary_factor": 1.0}
    found = features(phi3_4k)
    assert found.rot_dim == 0 and found.long_from == 0 and found.rope_mult == 1.0
    assert found.layer_sliding == [True] * 32 and found.window == 2047
    assert features({**phi4_mini, "partial_rotary_factor": 0.7}) == "partial rotary embedding"  # 89 dims
    assert features({**phi4_mini, "rope_scaling": {**phi4_mini["rope_scaling"], "long_factor": long[:3]}}).startswith(
        "rope parameters the engine cannot read")
