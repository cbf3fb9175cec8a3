"""smoothing: the rewrite is exact in float, and the exporter stores the rewritten model."""

from __future__ import annotations

import pytest
import torch

from tiny import make_model, make_tokenizer
from edgepack.format import bundle as bundle_format
from edgepack.export import smoothing


def qwen2_with_biases(vocab_size: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)  # biases and norms off their init
            else:
                p.mul_(4.0)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rewrite_is_exact_in_float(kind):
    """The rewritten model (norms stored bf16) computes what the source computes, while its
    tensors really differ: the factors are folded in, not left at 1."""
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer)) if kind == "llama" else qwen2_with_biases(len(tokenizer))
    plan = smoothing.plan(model, model.config, tokenizer, torch.bfloat16)
    assert plan.calibration["tokens"] > 100 and len(plan.factors) == 2
    source = {k: v.detach().clone() for k, v in model.state_dict().items()}
    read = plan.wrap(lambda key: source[key])
    rewritten = {k: read(k) for k in source}
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. Small boxes run small models.")])
    with torch.no_grad():
        before = model(ids).logits
        model.load_state_dict(rewritten)
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(rewritten[norm], rewritten[norm].to(torch.bfloat16).float())  # stored exactly in bf16
    assert (rewritten[norm] / source[norm] - 1).abs().max() > 0.05
    for key in ("self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        k = f"model.layers.1.{key}"
        assert not torch.allclose(rewritten[k], source[k], rtol=1e-2)
    if kind == "qwen2":
        k = "model.layers.0.self_attn.v_proj.bias"
        assert not torch.allclose(rewritten[k], source[k], rtol=1e-2)


def test_factors_follow_the_activations():
    rms = torch.tensor([1.0, 4.0, 16.0, 0.25], dtype=torch.float64)
    c = smoothing.factors(rms, 0.5)
    assert c.log().mean().abs() < 1e-12  # geometric mean 1
    assert torch.allclose(c[1:] / c[:-1], torch.tensor([2.0, 2.0, 0.125], dtype=torch.float64))


def test_unsupported_models():
    assert smoothing.unsupported({"model_type": "gpt2"}).startswith("model type 'gpt2'")
    assert "MLP" in smoothing.unsupported({"model_type": "llama", "mlp_bias": True})
    assert smoothing.unsupported({"model_type": "qwen2"}) is None


def test_8bit_llama_bundle_holds_the_rewritten_model(packed, tiny_models):
    """q_proj is stored as bitsandbytes' int8 of W * g / stored_norm: the norm and the
    columns after it carry the same factors; the manifest says how."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    bundle = packed("llama", 8, gptq=False)  # rounded to nearest, as bitsandbytes does
    q = bundle_format.read_manifest(bundle)["quantization"]
    assert q["smoothing"]["alpha"] == smoothing.ALPHA
    assert q["smoothing"]["calibration"]["tokens"] > 100 and len(q["smoothing"]["calibration"]["sha256"]) == 64
    stored = load_file(bundle / "model.safetensors")
    source = load_file(tiny_models["llama"] / "model.safetensors")
    p = "model.layers.0."
    g, g_stored = source[p + "input_layernorm.weight"].double(), stored[p + "input_layernorm.weight"].double()
    assert not torch.allclose(g, g_stored, rtol=0.02)
    for name in ("self_attn.q_proj", "self_attn.k_proj"):
        expected, scb, _ = F.int8_vectorwise_quant((source[p + name + ".weight"].double() * (g / g_stored)).float())
        assert torch.equal(stored[p + name + ".weight"], expected)
        assert torch.equal(stored[p + name + ".SCB"], scb)


def test_no_smoothing_where_it_does_not_apply(packed):
    assert "smoothing" not in bundle_format.read_manifest(packed("llama", 8, smoothing=False))["quantization"]
    assert "smoothing" not in bundle_format.read_manifest(packed("gpt2", 8))["quantization"]
    assert "smoothing" not in bundle_format.read_manifest(packed("llama", 4, quant_type="int4"))["quantization"]


def test_calibration_looks_like_what_the_model_sees():
    """Every sequence starts at position 0; with a chat template half are conversations in
    it (its special tokens carry outliers plain text never shows); the budget holds."""
    tokenizer = make_tokenizer()
    sequences, digest = smoothing.calibration_sequences(tokenizer, max_tokens=600, max_length=100)
    assert sum(map(len, sequences)) <= 600 and all(0 < len(s) <= 100 for s in sequences)
    user, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert sequences[0][0] == user and assistant in sequences[0]
    assert user not in sequences[1]
    assert len(digest) == 64


def test_damaged_calibration_text_is_a_clear_error(tiny_models, tmp_path, monkeypatch):
    from edgepack.errors import QuantizationError
    from edgepack.export.pack import pack

    short = tmp_path / "calibration.txt"
    short.write_text("too short")
    monkeypatch.setattr(smoothing, "CALIBRATION_TEXT", short)
    with pytest.raises(QuantizationError, match="gives only .* tokens") as err:
        pack(str(tiny_models["llama"]), tmp_path / "out", bits=8)
    assert "--no-smoothing" in err.value.hint
    assert not (tmp_path / "out").exists()
