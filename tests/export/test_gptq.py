"""gptq: error-compensated int8 rounding in bitsandbytes' format, and its calibration."""

from __future__ import annotations

import pytest
import torch

from tiny import make_model, make_tokenizer
from edgepack.format import bundle as bundle_format
from edgepack.export import gptq, smoothing


def test_scales_are_exact_in_bfloat16_and_as_small_as_they_can_be():
    absmax = torch.tensor([0.0, 1e-3, 0.37, 1.0, 5.5, 127.0, 300.1])
    s = gptq.bf16_exact_scales(absmax)
    assert torch.equal(s.bfloat16().float(), s)  # exact in bf16
    assert s[0] == 1.0  # a zero row gets a harmless scale
    wanted = absmax[1:] / 127
    assert (s[1:] >= wanted).all()
    below = torch.nextafter(s[1:].bfloat16(), torch.zeros(6, dtype=torch.bfloat16)).float()
    assert (below < wanted).all()  # one bf16 step smaller would clip the row's absmax


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    x = torch.randn(n, dim, generator=g) @ mix
    x[:, :3] *= 8  # a few outlier channels, as LLM activations have
    return x


def test_gptq_lowers_the_layer_output_error_and_keeps_the_format():
    torch.manual_seed(0)
    w = torch.randn(96, 160)
    x = correlated_inputs(2048, 160)
    h = (x.double().T @ x.double()) / x.shape[0]
    rtn_codes, rtn_scb = gptq.quantize_rows(w, None)
    codes, scb = gptq.quantize_rows(w, h)
    assert codes.dtype == torch.int8 and scb.dtype == torch.float32 and codes.shape == w.shape
    assert torch.equal(scb, rtn_scb)  # the same row scales: only the rounding differs
    assert codes.abs().max() <= 127
    assert not torch.equal(codes, rtn_codes)

    def output_error(c, s):
        return ((x @ (w - c.float() * s[:, None] / 127).T).norm() / (x @ w.T).norm()).item()

    assert output_error(codes, scb) < 0.8 * output_error(rtn_codes, rtn_scb)
    # ... while each weight stays near its own value (a few grid steps at most)
    step = scb[:, None] / 127
    assert ((codes.float() * step - w).abs() / step).max() < 8


def test_uncorrelated_inputs_make_gptq_round_to_nearest():
    """With a diagonal Hessian no error has anywhere to go: the codes are the nearest ones."""
    torch.manual_seed(1)
    w = torch.randn(32, 48)
    h = torch.diag(torch.rand(48, dtype=torch.float64) + 0.5)
    h[5, 5] = 0  # a dead input: its weight is dropped (zero), not rounded
    codes, _ = gptq.quantize_rows(w, h)
    nearest, _ = gptq.quantize_rows(w, None)
    alive = torch.arange(48) != 5
    assert torch.equal(codes[:, alive], nearest[:, alive])
    assert (codes[:, 5] == 0).all()


def test_layerwise_calibration_matches_a_full_forward():
    """Hessians a layer at a time equal X^T X / n of each projection's input in one forward
    of the whole model; the kept hidden states follow the model layer by layer."""
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    sequences = [tokenizer.encode("Small boxes run small models. " * 3), tokenizer.encode("The capital of France")]
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for i in range(2):
        for site in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{site}"
            handles.append(model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, name=name: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for ids in sequences:
            model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    calibration = gptq.LayerwiseCalibration(model, sequences)
    for i in range(2):
        for module, site in (("self_attn.k_proj", "self_attn.q_proj"), ("self_attn.o_proj", "self_attn.o_proj"),
                             ("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj", "mlp.down_proj")):
            x = torch.cat(inputs[f"model.layers.{i}.{site}"]).double()
            expected = x.T @ x / x.shape[0]
            got = calibration.hessian(i, module).double()
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item()), (i, module)
    assert calibration.hessian(0, "self_attn.q_proj") is None  # a layer already passed
    assert calibration.hessian(1, "lm_head") is None


def test_default_8bit_llama_bundle_is_gptq_rounded(packed):
    bundle = packed("llama", 8)
    q = bundle_format.read_manifest(bundle)["quantization"]
    assert q["rounding"]["calibration_tokens"] > 100 and q["rounding"]["damp"] == gptq.DAMP
    assert "rounding" not in bundle_format.read_manifest(packed("llama", 8, gptq=False))["quantization"]
    assert "rounding" not in bundle_format.read_manifest(packed("gpt2", 8))["quantization"]
    assert "rounding" not in bundle_format.read_manifest(packed("llama", 4, quant_type="int4"))["quantization"]


def test_smoothed_hessian_is_the_rewritten_models():
    """With smoothing, GPTQ must weigh the *rewritten* layer's inputs: X / d for columns
    scaled by d. The Hessian quantize_model hands GPTQ equals one measured on the rewritten
    model itself."""
    from edgepack.export.quantize import _hessian

    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    plan = smoothing.plan(model, model.config, tokenizer, torch.float32)
    source = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sequences, _ = smoothing.calibration_sequences(tokenizer, max_tokens=256)
    calibration = gptq.LayerwiseCalibration(model, sequences)
    got = {m: _hessian(f"model.layers.0.{m}", calibration, plan, lambda k: source[k])
           for m in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
    rewritten = make_model("llama", len(tokenizer))
    read = plan.wrap(lambda key: source[key])
    rewritten.load_state_dict({k: read(k).to(v.dtype) for k, v in source.items()})
    expected = gptq.LayerwiseCalibration(rewritten, sequences)
    for module, h in got.items():
        e = expected.hessian(0, module).double()
        assert torch.allclose(h.double(), e, rtol=2e-3, atol=1e-5 * e.abs().max().item()), module


@pytest.mark.parametrize("bad", ["nan"])
def test_a_hessian_that_is_not_finite_is_refused(bad):
    h = torch.eye(8, dtype=torch.float64)
    h[2, 3] = float(bad)
    with pytest.raises(ValueError, match="not finite"):
        gptq.quantize_rows(torch.randn(4, 8), h)
