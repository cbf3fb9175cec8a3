"""The planner: byte counts by hand, checked against real bundles; decisions per device."""

from __future__ import annotations

import json

import pytest

from edgepack.cli import main as cli_main
from edgepack.errors import PlanError
from edgepack.plan import planner, sizing
from edgepack.plan.model import ModelDescription
from edgepack.plan.sizing import Quant
from edgepack.plan.profile import DeviceProfile, list_profiles, load_profile

MIB = 1 << 20
GIB = 1 << 30


@pytest.fixture(scope="session")
def describe(tiny_models):
    """describe(kind) -> ModelDescription of a tiny test model (vocab 400), from its config."""
    from edgepack.cli.plan import describe_model, load_config

    cache = {}

    def get(kind: str) -> ModelDescription:
        if kind not in cache:
            cache[kind] = describe_model(load_config(str(tiny_models[kind])), name=f"tiny-{kind}")
        return cache[kind]

    return get


def profile(name: str, **changes) -> DeviceProfile:
    """A built-in profile with some figures replaced; gpu_usable_bytes sets gpus[0]."""
    d = load_profile(name).to_dict()
    gpu_usable = changes.pop("gpu_usable_bytes", None)
    ram_usable = changes.pop("ram_usable_bytes", None)
    d.update(changes)
    if ram_usable is not None:
        d["ram_bytes"] = d["ram_reserved_bytes"] + ram_usable
    if gpu_usable is not None:
        g = d["gpus"][0]
        g["memory_bytes"] = g["reserved_bytes"] + gpu_usable
        if d["unified_memory"]:
            d["ram_bytes"] = g["memory_bytes"]
    return DeviceProfile.from_dict(d, origin=f"test copy of {name}")


# --- storage layout, counted by hand ----------------------------------------------------------
#
# Tiny GPT-2: vocab 400, n_embd 64, 2 layers, 128 positions, lm_head tied to wte.
#   wte 400*64 = 25,600 params; wpe 128*64 = 8,192; ln_f 64+64 = 128 (all 16-bit, 2 bytes)
#   per layer: ln_1 + ln_2 = 256 params (16-bit); linears c_attn 192x64 = 12,288,
#   attn.c_proj 64x64 = 4,096, c_fc 256x64 = 16,384, mlp.c_proj 64x256 = 16,384
#   (49,152 params, 576 output rows); their biases 192+64+256+64 = 576 params (16-bit)
# Tiny Llama: vocab 400, hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads (dim 16).
#   embed 25,600 params; norm 64; lm_head tied (or 25,600 more when untied)
#   per layer: 2 norms = 128 params; q 64x64 = 4,096, k 32x64 = 2,048, v 32x64 = 2,048,
#   o 64x64 = 4,096, gate 128x64 = 8,192, up 128x64 = 8,192, down 64x128 = 8,192
#   (36,864 params, 512 output rows); no biases
#
# 4-bit nf4 per linear = ceil(n/2) packed + 4*ceil(n/64) float32 absmax + 16*4 quant_map
#   + the quant_state JSON, len('{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16",
#   "shape": [O, I]}') = 70 + len("O, I]}"): 78 for [64, 64], 79 for [192, 64]
#   GPT-2:  c_attn 7,055 = 6,144+768+64+79; attn.c_proj 2,446 = 2,048+256+64+78;
#           c_fc 9,359 = 8,192+1,024+64+79; mlp.c_proj 9,359
#   Llama:  q, o 2,446 = 2,048+256+64+78; k, v 1,294 = 1,024+128+64+78;
#           gate, up, down 4,751 = 4,096+512+64+79

HAND_COUNTED = {
    # 16-bit: 2 bytes a parameter
    ("gpt2", 16): 267_776,  # = 2*(25,600+8,192+128) + 2*(2*(256+576+49,152)) = 67,840 + 2*99,968
    ("llama", 16): 199_296,  # = 2*(25,600+64) + 2*(2*(128+36,864)) = 51,328 + 2*73,984
    ("llama-untied", 16): 250_496,  # = 199,296 + 2*25,600
    # 8-bit: int8 weights + float32 SCB per output row; the rest 16-bit
    ("gpt2", 8): 174_080,  # = 67,840 + 2*(512 + 1,152 + 49,152 + 4*576) = 67,840 + 2*53,120
    # the engine runs Llama: its tables are 8-bit by default, int8 + a float16 per 32 values
    ("llama", 8): 105_664,  # = 51,328 + 2*(256 + 36,864 + 4*512) - (51,200 - 27,200) = 129,664 - 24,000
    ("llama-untied", 8): 132_864,  # = 105,664 + 27,200
    # 4-bit nf4, no double quant
    ("gpt2", 4): 127_606,  # = 67,840 + 2*(512 + 1,152 + 7,055+2,446+9,359+9,359) = 67,840 + 2*29,883
    ("llama", 4): 95_306,  # = 51,328 + 2*(256 + 2*2,446 + 2*1,294 + 3*4,751) = 51,328 + 2*21,989
    ("llama-untied", 4): 146_506,  # = 95,306 + 51,200
}


@pytest.mark.parametrize("kind,bits", sorted(HAND_COUNTED))
def test_weight_bytes_by_hand(describe, kind, bits):
    assert sizing.weight_bytes(describe(kind), Quant(bits)) == HAND_COUNTED[(kind, bits)]


@pytest.mark.parametrize("kind,bits", sorted(HAND_COUNTED))
def test_weight_bytes_equal_the_bundles(describe, packed, kind, bits):
    """The storage-layout model is exact: same bytes as the exporter writes."""
    from edgepack.format import bundle as bundle_format

    manifest = bundle_format.read_manifest(packed(kind, bits))
    assert sizing.weight_bytes(describe(kind), Quant(bits)) == manifest["memory"]["weight_bytes"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_double_quant_within_the_offset_digits(describe, packed, kind):
    """Double quant adds uint8 block scales, a float32 per 256 of them and a 256-entry map;
    only the printed nested_offset's length (±a few characters per layer) is unknown."""
    from edgepack.format import bundle as bundle_format

    manifest = bundle_format.read_manifest(packed(kind, 4, quant_type="fp4", double_quant=True))
    layers = len(manifest["quantization"]["quantized_modules"])
    got = sizing.weight_bytes(describe(kind), Quant(4, "fp4", double_quant=True))
    assert abs(got - manifest["memory"]["weight_bytes"]) <= 6 * layers


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-untied"])
def test_int4_weight_bytes_equal_the_bundles(describe, packed, kind):
    from edgepack.format import bundle as bundle_format

    manifest = bundle_format.read_manifest(packed(kind, 4, quant_type="int4"))
    assert sizing.weight_bytes(describe(kind), Quant(4, "int4")) == manifest["memory"]["weight_bytes"]


def test_int4_is_a_cpu_format(describe, tiny_models):
    from edgepack.cli.plan import plan_for_pack

    llama = describe("llama")
    # 4096x4096 int4: 8,388,608 codes + 128 groups x 4096 rows x (scale + zero) x 2 bytes
    assert sizing.linear_weight_bytes(4096, 4096, Quant(4, "int4")) == 8_388_608 + 2_097_152
    assert sizing.linear_weight_bytes(40, 4096, Quant(4, "int4")) == 2 * 40 * 4096  # 40 rows: kept 16-bit
    p = planner.plan(llama, load_profile("t4"), context=128, bits=4, quant_type="int4")
    assert (p.strategy, set(p.device_map.values())) == ("cpu", {"cpu"})  # never on the GPU
    with pytest.raises(PlanError, match="int4 is edgepack's CPU format"):
        planner.place(llama, load_profile("t4"), 4, "gpu", context=128, quant_type="int4")
    cpu = planner.plan(llama, load_profile("rpi4-4gb"), context=128, bits=4, quant_type="int4")
    assert cpu.quant_type == "int4" and cpu.devices["cpu"].allocator_bytes == 0
    assert "dequantized one at a time" not in " ".join(cpu.reasons)
    # pack --profile without --quant-type: int4 on a CPU-only box, nf4 where there is a GPU
    got = plan_for_pack(str(tiny_models["llama"]), "rpi4-4gb", 128, 4, None, None, None, None)
    assert got["quant_type"] == "int4"
    assert plan_for_pack(str(tiny_models["llama"]), "t4", 128, 4, None, None, None, None)["quant_type"] == "nf4"


def test_linear_weight_bytes_layouts():
    # 8-bit 4096x4096: 16,777,216 int8 + 4*4,096 SCB = 16,793,600
    assert sizing.linear_weight_bytes(4096, 4096, Quant(8)) == 16_793_600
    # 4-bit 4096x4096: 8,388,608 packed + 4*262,144 absmax + 64 + 82 (JSON, "[4096, 4096]}")
    assert sizing.linear_weight_bytes(4096, 4096, Quant(4)) == 8_388_608 + 1_048_576 + 64 + 82
    # double quant: 262,144 uint8 scales + 4*1,024 nested + 256*4 nested map + 64 + JSON
    dq = Quant(4, double_quant=True)
    json_bytes = sizing.quant_state_bytes(4096, 4096, dq)
    assert sizing.linear_weight_bytes(4096, 4096, dq) == 8_388_608 + 262_144 + 4_096 + 1_024 + 64 + json_bytes
    assert json_bytes == 82 + len(', "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": ') + 19


def test_8bit_offloaded_to_cpu_counts_float32(describe):
    layer = next(b for b in describe("llama").blocks if b.kind == "layer")
    # 2*128 norms + 4*36,864 float32 weights = 147,712
    assert sizing.block_weight_bytes(layer, Quant(8), fp32_linears=True) == 147_712


def test_describe_model_blocks(describe, tiny_models):
    llama, gpt2 = describe("llama"), describe("gpt2")
    assert [b.name for b in llama.blocks] == ["model.embed_tokens", "model.layers.0", "model.layers.1",
                                              "model.norm", "model.rotary_emb", "lm_head"]
    assert [b.kind for b in llama.blocks] == ["embedding", "layer", "layer", "norm", "rotary", "output"]
    assert llama.blocks[-1].tied_to == "model.embed_tokens" and llama.tie_word_embeddings
    assert describe("llama-untied").blocks[-1].tied_to is None
    assert describe("llama-untied").blocks[-1].kept_params == 400 * 64
    assert gpt2.blocks[-1].tied_to == "transformer.wte"
    assert (llama.num_key_value_heads, llama.head_dim, llama.vocab_size) == (2, 16, 400)
    assert llama.gated_mlp and not gpt2.gated_mlp
    assert llama.lean and not gpt2.lean
    assert ModelDescription.from_dict(json.loads(json.dumps(llama.to_dict()))) == llama



@pytest.mark.parametrize("kind", ["llama", "llama-untied", "qwen2", "mistral"])
def test_llama_family_described_from_numbers_as_on_the_meta_device(tiny_models, kind):
    """config.json's numbers alone (no torch) give the blocks the meta-device model has."""
    from transformers import AutoConfig, MistralConfig, Qwen2Config

    from edgepack.plan.model import config_only, describe_model

    if kind in tiny_models:
        config = AutoConfig.from_pretrained(tiny_models[kind])
    else:  # biases on q/k/v (qwen2), or none and no mlp_bias option (mistral)
        cls = Qwen2Config if kind == "qwen2" else MistralConfig
        config = cls(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    raw = json.loads(config.to_json_string())
    assert config_only(raw)
    assert describe_model(raw, name="m") == describe_model(config, name="m")


def test_gguf_header_gives_transformers_config(tmp_path):
    """The planner's GGUF header reader gives the numbers transformers reads from the file,
    skipping the tokenizer's strings; a file of another architecture is left to transformers."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from transformers import AutoConfig

    from edgepack.plan.gguf import llama_config

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(400)])
    w.add_tensor("token_embd.weight", np.zeros((400, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = llama_config(path)
    want = AutoConfig.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert got == {"model_type": "llama", "max_position_embeddings": 256, "num_hidden_layers": 2,
                   "intermediate_size": 96, "hidden_size": 64, "head_dim": 16, "rope_theta": 10000.0,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": pytest.approx(1e-5),
                   "vocab_size": 400, "tie_word_embeddings": True}
    for key in ("max_position_embeddings", "num_hidden_layers", "intermediate_size", "hidden_size", "head_dim",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert getattr(want, key) == got[key], key
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))  # no tensors, no keys
    assert llama_config(other) is None


def test_plan_command_reads_no_torch_for_a_llama_config(tiny_models):
    import subprocess
    import sys

    code = ("import sys, io, contextlib; from edgepack.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['plan', sys.argv[1], '--profile', 'rpi5-4gb'])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_models["llama"])], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]

# --- memory model ----------------------------------------------------------------------------


def test_kv_cache_bytes(describe):
    llama = describe("llama")
    # static bf16: 2 (K, V) * 2 layers * 2 KV heads * 16 dims * 128 tokens * 2 bytes = 32,768
    assert sizing.kv_cache_bytes(llama, sizing.LEAN, 2, 128, 1) == 32_768
    # growing 16-bit: 32,768, plus one layer's K in transit during torch.cat: 2*16*128*2 = 8,192
    assert sizing.kv_cache_bytes(llama, sizing.TRANSFORMERS, 2, 128, 1) == 32_768 + 8_192


def test_kv_cache_of_sliding_window_layers_is_their_window_on_the_engine():
    """Gemma 3's 5 sliding-window layers in 6 keep their last sliding_window positions (the C
    engine's rings): at 8k context the cache is 1/6 of a full one plus the windows; the same
    NativeCache the runtime allocates."""
    from transformers import Gemma3TextConfig

    from edgepack.cli.plan import describe_model
    from edgepack.runtime.engine import NativeCache, _native

    config = Gemma3TextConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=512)
    gemma = describe_model(config, name="tiny-gemma3")
    assert gemma.engine and not gemma.lean and (gemma.sliding_layers, gemma.sliding_window) == (5, 512)
    per_position = 2 * 1 * 16 * 2  # K and V, 1 KV head, 16 dims, bf16
    got = planner.kv_cache_bytes(gemma, planner.NATIVE, 6, 8192, 1)
    assert got == per_position * (8192 + 5 * 512)
    assert planner.kv_cache_bytes(gemma, planner.LEAN, 6, 8192, 1) == per_position * 6 * 8192  # a full cache: 4.6x
    if _native is not None:
        assert len(NativeCache(6, 1, 16, 8192, sliding=5, window=512).memory) == got


def test_activations_peak_at_the_prefill_logits(describe):
    llama = describe("llama")
    full = sizing.activation_bytes(llama, sizing.TRANSFORMERS, 100, 1, holds_layers=True, holds_output=True)
    last = sizing.activation_bytes(llama, sizing.LEAN, 100, 1, holds_layers=True, holds_output=True)
    # transformers: logits [1, 100, 400] 16-bit = 80,000 + the final hidden states 2*100*64*2
    assert full["logits"] == 80_000 + 25_600
    # lean: logits of the last row only, 400*2, + float32 hidden states 2*100*64*4
    assert last["logits"] == 800 + 51_200


# --- decisions --------------------------------------------------------------------------------


def test_gpu_with_room_takes_16bit_all_on_cuda(describe):
    p = planner.plan(describe("llama"), load_profile("t4"), context=128)
    assert (p.bits, p.strategy, p.fits) == (16, "gpu", True)
    assert set(p.device_map.values()) == {"cuda:0"}
    assert list(p.device_map) == [b.name for b in describe("llama").blocks]
    assert set(p.devices) == {"cuda:0", "cpu"}  # the host process stays in RAM
    assert p.devices["cuda:0"].weights_bytes == HAND_COUNTED[("llama", 16)]
    assert p.devices["cpu"].baseline_bytes > 0 and p.devices["cuda:0"].baseline_bytes == 0
    assert p.devices["cpu"].loading_bytes == HAND_COUNTED[("llama", 16)]  # staged in RAM first
    assert "tied to model.embed_tokens" in " ".join(p.reasons)


def test_gpu_too_small_for_16bit_takes_fewer_bits(describe):
    llama = describe("llama")
    big = load_profile("t4")
    need8 = planner.place(llama, big, 8, "gpu", context=128).devices["cuda:0"].total_bytes
    need16 = planner.place(llama, big, 16, "gpu", context=128).devices["cuda:0"].total_bytes
    assert need8 < need16
    p = planner.plan(llama, profile("t4", gpu_usable_bytes=need8), context=128)
    assert (p.bits, p.strategy) == (8, "gpu")
    assert set(p.device_map.values()) == {"cuda:0"}
    assert any("16-bit all on cuda:0 would need" in r for r in p.reasons)


def test_prefers_fewer_bits_on_the_gpu_over_offloading_more(describe):
    llama = describe("llama")
    need8 = planner.place(llama, load_profile("t4"), 8, "gpu", context=128).devices["cuda:0"].total_bytes
    p = planner.plan(llama, profile("t4", gpu_usable_bytes=need8), context=128)
    offload16 = planner.place(llama, profile("t4", gpu_usable_bytes=need8), 16, "offload", context=128)
    assert offload16.fits and "cpu" in offload16.device_map.values()  # possible, yet not chosen
    assert p.bits == 8 and "entirely on the GPU is preferred" in " ".join(p.reasons)


def test_gpu_too_small_even_at_4bit_offloads(describe):
    llama = describe("llama")
    t4 = load_profile("t4")
    need4 = planner.place(llama, t4, 4, "gpu", context=128).devices["cuda:0"].total_bytes
    first = planner.device_budget(llama, t4, 16, "offload", "cuda:0", ["model.embed_tokens", "lm_head"], context=128)
    gpu = (first.total_bytes + need4) // 2
    assert first.total_bytes < gpu < need4
    p = planner.plan(llama, profile("t4", gpu_usable_bytes=gpu), context=128)
    assert p.strategy == "offload" and p.bits == 16
    assert p.device_map["model.embed_tokens"] == p.device_map["lm_head"] == "cuda:0"  # tied: together
    assert p.device_map["model.layers.1"] == "cpu"
    assert "4-bit layers cannot be offloaded" in " ".join(p.reasons)


def test_8bit_offload_when_16bit_offload_needs_too_much_ram(describe):
    """Untied Llama: at 8-bit the GPU holds everything but the 16-bit lm_head; at 16-bit it
    holds only the embeddings and layer 0, so the CPU must hold more."""
    untied = describe("llama-untied")
    t4 = load_profile("t4")
    gpu_part = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb"]
    gpu = planner.device_budget(untied, t4, 8, "offload", "cuda:0", gpu_part, context=128).total_bytes
    p8 = planner.place(untied, profile("t4", gpu_usable_bytes=gpu), 8, "offload", context=128)
    p16 = planner.place(untied, profile("t4", gpu_usable_bytes=gpu), 16, "offload", context=128)
    assert [n for n, d in p8.device_map.items() if d == "cpu"] == ["lm_head"]
    ram8, ram16 = p8.devices["cpu"].total_bytes, p16.devices["cpu"].total_bytes
    assert ram8 < ram16
    p = planner.plan(untied, profile("t4", gpu_usable_bytes=gpu, ram_usable_bytes=ram8), context=128)
    assert (p.bits, p.strategy) == (8, "offload")
    assert p.devices["cpu"].weights_bytes == 2 * 400 * 64  # the 16-bit lm_head


def test_8bit_layers_offloaded_beside_a_gpu_are_float32(describe):
    llama = describe("llama")
    t4 = load_profile("t4")
    first = planner.device_budget(llama, t4, 8, "offload", "cuda:0", ["model.embed_tokens", "model.layers.0", "lm_head"],
                                  context=128).total_bytes
    p = planner.place(llama, profile("t4", gpu_usable_bytes=first), 8, "offload", context=128)
    assert [n for n, d in p.device_map.items() if d == "cpu"] == ["model.layers.1", "model.norm", "model.rotary_emb"]
    assert p.devices["cpu"].weights_bytes == 147_712 + 2 * 64  # layer 1 in float32 + the final norm


def test_two_gpus_split_whole_blocks_and_keep_tied_weights_together(describe):
    llama = describe("llama")
    t4 = load_profile("t4")
    first = ["model.embed_tokens", "model.layers.0", "lm_head"]
    gpu = planner.device_budget(llama, t4, 16, "gpu", "cuda:0", first, context=128).total_bytes
    d = t4.to_dict()
    g = d["gpus"][0]
    g["memory_bytes"] = g["reserved_bytes"] + gpu
    d["gpus"] = [g, dict(g)]
    p = planner.plan(llama, DeviceProfile.from_dict(d), context=128)
    assert (p.bits, p.strategy) == (16, "gpu")
    assert {n: p.device_map[n] for n in first} == {n: "cuda:0" for n in first}
    assert p.device_map["model.layers.1"] == p.device_map["model.norm"] == "cuda:1"
    assert p.devices["cuda:0"].activations_bytes >= sizing.activation_bytes(
        llama, sizing.TRANSFORMERS, 128, 1, holds_layers=True, holds_output=True)["logits"]


def test_4bit_never_mixes_gpu_and_cpu(describe):
    llama = describe("llama")
    tiny_gpu = profile("t4", gpu_usable_bytes=1 * MIB)
    p = planner.plan(llama, tiny_gpu, context=128, bits=4)
    assert len(set(p.device_map.values())) == 1
    with pytest.raises(PlanError, match="cannot be offloaded"):
        planner.place(llama, tiny_gpu, 4, "offload")


def test_refuses_with_numbers_and_the_nearest_fit(describe):
    llama = describe("llama")
    # the least any setting needs at context 128; a GPU too small for anything
    need = min(planner.place(llama, load_profile("t4"), b, "cpu", context=128).devices["cpu"].total_bytes
               for b in (16, 8, 4))
    box = profile("t4", gpu_usable_bytes=1 * MIB, ram_usable_bytes=need - 1)
    with pytest.raises(PlanError) as caught:
        planner.plan(llama, box, context=128, alternatives=list_profiles())
    err = caught.value
    assert "does not fit t4 at a context of 128 tokens" in err.message
    assert f"{need / MIB:.1f} MiB on cpu" in err.message and "usable" in err.message
    assert "weights" in err.message and "baseline" in err.message
    # the longest context that fits at 4-bit, and it really is the longest
    fits = int(err.hint.split("(--context ")[1].split(")")[0])
    assert planner.plan(llama, box, context=fits).fits
    with pytest.raises(PlanError):
        planner.plan(llama, box, context=fits + 1)
    assert "smallest built-in profile that fits is" in err.hint


def test_refusal_names_the_smallest_builtin_profile(describe):
    llama = describe("llama")
    with pytest.raises(PlanError) as caught:
        planner.plan(llama, profile("rpi4-4gb", ram_usable_bytes=64 * MIB), context=128, alternatives=list_profiles())
    smallest = min(list_profiles(), key=lambda p: p.ram_usable_bytes + sum(g.usable_bytes for g in p.gpus)
                   * (not p.unified_memory))
    assert f"is {smallest.name} (" in caught.value.hint


def test_cpu_only(describe):
    llama = describe("llama")
    # a 4-token prompt: the tiny model's weights (200 KB) are smaller than the prompt paths'
    # workspace for a long prompt, so only a short one makes 8-bit the smaller setting
    short = {"context": 128, "prompt_tokens": 4}
    p = planner.plan(llama, load_profile("rpi4-4gb"), **short)
    assert (p.bits, p.strategy, p.runtime) == (16, "cpu", "native")  # the engine's NEON kernels on a Pi
    assert set(p.device_map.values()) == {"cpu"} and set(p.devices) == {"cpu"}
    assert p.devices["cpu"].capacity_bytes == load_profile("rpi4-4gb").ram_usable_bytes
    need16 = p.devices["cpu"].total_bytes
    need8 = planner.place(llama, load_profile("rpi4-4gb"), 8, "cpu", **short).devices["cpu"].total_bytes
    assert need8 < need16
    assert planner.plan(llama, profile("rpi4-4gb", ram_usable_bytes=need8), **short).bits == 8
    assert planner.plan(describe("gpt2"), load_profile("rpi4-4gb"), context=128).runtime == "transformers"


def test_cpu_only_x86_runs_the_c_engine(describe):
    """On x86-64 CPUs, Llama-family int8/int4/16-bit bundles run in edgepack's C engine: no
    torch in the process, prompt activations bounded by its 96-token chunks."""
    llama, laptop = describe("llama"), load_profile("cpu-laptop-8gb")
    short = {"context": 128, "prompt_tokens": 100}
    p8 = planner.place(llama, laptop, 8, "cpu", **short)
    assert planner.plan(llama, laptop, bits=8, **short).runtime == "native"
    assert planner.plan(llama, laptop, bits=4, quant_type="int4", **short).runtime == "native"
    assert planner.plan(llama, laptop, bits=4, quant_type="nf4", **short).runtime == "lean"
    assert planner.plan(describe("gpt2"), laptop, bits=8, **short).runtime == "transformers"
    lean8 = planner.place(llama, laptop, 8, "cpu", runtime="lean", **short)
    native, lean = p8.devices["cpu"], lean8.devices["cpu"]
    table = 400 * 64  # tiny-llama's tied [vocab, hidden]: the engine holds it as stored, 8-bit
    assert native.weights_bytes == lean.weights_bytes - (2 * table - sizing.table_bytes(400, 64))
    assert native.kv_cache_bytes == lean.kv_cache_bytes
    assert native.baseline_bytes == sizing.BASELINE_BYTES[("x86_64", "native")] + sizing.TOKENIZER_BYTES_PER_TOKEN * llama.vocab_size
    assert native.baseline_bytes < lean.baseline_bytes - 200 * MIB and native.loading_bytes == 0
    # a prompt runs PROMPT_CHUNK tokens at a time: a longer one adds only its attention scores
    longer = planner.place(llama, laptop, 8, "cpu", context=128, prompt_tokens=120).devices["cpu"]
    assert longer.activations_bytes == native.activations_bytes
    shorter = planner.place(llama, laptop, 8, "cpu", context=128, prompt_tokens=50).devices["cpu"]
    assert shorter.activations_bytes < native.activations_bytes
    assert "without torch and edgepack's native runtime" in " ".join(planner.plan(llama, laptop, bits=8, **short).reasons)


def test_unified_memory_counts_the_pool_once(describe):
    llama = describe("llama")
    jetson = load_profile("jetson-orin-nano-8gb")
    p = planner.plan(llama, jetson, context=128)
    assert (p.bits, p.strategy) == (16, "gpu") and set(p.devices) == {"cuda:0"}
    pool = p.devices["cuda:0"]
    assert pool.capacity_bytes == jetson.gpu_usable_bytes(0)  # never ram_usable + gpu_usable
    assert pool.baseline_bytes > 0 and pool.cuda_context_bytes == 0  # the reserve holds the context
    # a pool just too small for 16-bit: 8-bit, although RAM + GPU "added" would hold 16-bit twice
    need8 = planner.place(llama, jetson, 8, "gpu", context=128).devices["cuda:0"].total_bytes
    small = profile("jetson-orin-nano-8gb", gpu_usable_bytes=need8)
    assert small.ram_usable_bytes + small.gpu_usable_bytes(0) > 2 * pool.total_bytes
    assert planner.plan(llama, small, context=128).bits == 8
    assert "Unified memory" in " ".join(p.reasons)


def test_bits_override_is_honoured_and_reported(describe):
    llama = describe("llama")
    short = {"context": 128, "prompt_tokens": 4}  # see test_cpu_only
    need8 = planner.place(llama, load_profile("rpi4-4gb"), 8, "cpu", **short).devices["cpu"].total_bytes
    box = profile("rpi4-4gb", ram_usable_bytes=need8)
    p = planner.plan(llama, box, bits=16, **short)
    assert p.bits == 16 and not p.fits and not p.devices["cpu"].fits
    assert "does NOT fit" in p.reasons[0] and "bits forced to 16" in p.reasons[0]
    assert p.instead[0].startswith("8-bit int8 all on cpu would fit")
    assert planner.plan(llama, box, bits=4, **short).bits == 4


def test_options_are_checked(describe):
    llama = describe("llama")
    with pytest.raises(PlanError, match="longer than"):
        planner.plan(llama, load_profile("t4"), context=129)
    with pytest.raises(PlanError, match="bits"):
        planner.plan(llama, load_profile("t4"), bits=3)
    assert planner.plan(llama, load_profile("t4")).context == 128  # default: min(2048, the model's max)


def test_plan_to_dict_is_json(describe):
    p = planner.plan(describe("gpt2"), load_profile("t4").to_dict(), context=64, batch=2)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["bits"] == 16 and d["batch"] == 2 and d["device_map"]["lm_head"] == "cuda:0"
    cpu = d["devices"]["cpu"]
    assert set(cpu) >= {"capacity", "weights", "kv_cache", "activations", "baseline", "cuda_context", "headroom", "total"}
    assert cpu["total"] == cpu["peak"] + cpu["headroom"]


def test_planner_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys; from edgepack.plan import planner; from edgepack.plan.profile import load_profile; "
            "planner._Target.of(load_profile('t4')); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_prints_the_decision_and_a_table(tiny_models, capsys):
    assert cli_main(["plan", str(tiny_models["llama"]), "--profile", "t4", "--context", "128"]) == 0
    out = capsys.readouterr().out
    assert "decision: 16-bit, all on cuda:0: fits" in out
    header = next(line for line in out.splitlines() if line.startswith("device"))
    for column in ("capacity", "weights", "KV cache", "activations", "baseline", "headroom", "total"):
        assert column in header
    assert any(line.startswith("cuda:0") for line in out.splitlines())
    assert "device_map: model.embed_tokens, model.layers.0-1, model.norm, model.rotary_emb, lm_head -> cuda:0" in out


def test_cli_default_profile_run(tiny_models, capsys):
    assert cli_main(["plan", str(tiny_models["gpt2"]), "--profile", "t4"]) == 0
    assert "gpt2" in capsys.readouterr().out


def test_cli_json(tiny_models, capsys):
    assert cli_main(["plan", str(tiny_models["gpt2"]), "--profile", "rpi4-4gb", "--json", "--prefer", "quality"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["profile"] == "rpi4-4gb" and d["bits"] == 16 and d["fits"] and d["prefer"] == "quality"
    assert cli_main(["plan", str(tiny_models["gpt2"]), "--profile", "rpi4-4gb", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)  # balanced, the default: a float32 source, 8 bits within budget
    assert d["prefer"] == "balanced" and d["bits"] == 8 and d["expected_kl"] == 0.00137
    assert set(d["device_map"]) == {"transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                                    "transformer.ln_f", "lm_head"}


def test_cli_refusal_is_an_error_with_a_hint(tiny_models, tmp_path, capsys):
    d = load_profile("rpi4-4gb").to_dict()
    d.update(name="tiny-box", ram_bytes=d["ram_reserved_bytes"] + 32 * MIB)
    path = tmp_path / "tiny-box.json"
    path.write_text(json.dumps(d))
    assert cli_main(["plan", str(tiny_models["llama"]), "--profile", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not fit tiny-box" in err and "\nhint: " in err


def test_cli_accepts_a_probed_profile(tiny_models, tmp_path, capsys):
    out = tmp_path / "f.json"
    assert cli_main(["profile", "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli_main(["plan", str(tiny_models["llama"]), "--profile", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and d["profile"] == load_profile(str(out)).name


def test_plan_for_pack(tiny_models):
    from edgepack.cli.plan import plan_for_pack

    said = []
    got = plan_for_pack(str(tiny_models["llama"]), "t4", 128, None, None, None, "nf4", said.append)
    assert set(got) == {"bits", "quant_type", "dtype", "device_map", "target_profile", "plan"}
    assert got["bits"] == 16 and got["target_profile"]["name"] == "t4"
    assert got["dtype"] == "float16"  # t4: "bf16": false
    assert got["plan"]["device_map"] == got["device_map"] and said
    with pytest.raises(PlanError, match="does not fit"):
        plan_for_pack(str(tiny_models["llama"]), str(_tiny_box_file(tiny_models)), 128, 16, None, None, "nf4", None)


def _tiny_box_file(tiny_models):
    d = load_profile("rpi4-4gb").to_dict()
    d.update(name="tiny-box", ram_bytes=d["ram_reserved_bytes"] + 32 * MIB)
    path = tiny_models["llama"].parent / "tiny-box.json"
    path.write_text(json.dumps(d))
    return path


def test_pack_for_a_cpu_only_profile_at_more_than_4_bits(tiny_models, tmp_path):
    """The CPU-only default quant type (int4) must not get in the way when the plan picks
    16 or 8 bits (it once failed with "unsupported 4-bit block size 32")."""
    from edgepack.format import bundle as bundle_format

    out = tmp_path / "cpu"
    args = ["pack", str(tiny_models["llama"]), "-o", str(out), "--profile", "rpi4-4gb", "--context", "128", "-q",
            "--prefer", "quality"]
    assert cli_main(args) == 0
    assert bundle_format.read_manifest(out)["quantization"]["bits"] == 16
    assert cli_main([*args[:3], str(tmp_path / "cpu8"), *args[4:], "--bits", "8"]) == 0
    assert bundle_format.read_manifest(tmp_path / "cpu8")["quantization"]["scheme"] == "int8-rowwise"


def test_pack_with_a_profile_records_the_plan(tiny_models, tmp_path):
    from edgepack.format import bundle as bundle_format

    out = tmp_path / "planned"
    assert cli_main(["pack", str(tiny_models["llama"]), "-o", str(out), "--profile", "t4", "--context", "128", "-q"]) == 0
    manifest = bundle_format.read_manifest(out)
    assert manifest["quantization"]["bits"] == 16
    assert set(manifest["device_map"].values()) == {"cuda:0"}
    assert manifest["target_profile"]["name"] == "t4" and manifest["plan"]["fits"]
    assert manifest["plan"]["weight_bytes"] == manifest["memory"]["weight_bytes"]
