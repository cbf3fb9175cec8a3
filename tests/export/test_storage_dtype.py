"""A profile whose GPU has no bfloat16 ("bf16": false: gtx1650-4gb, t4) packs float16."""

from __future__ import annotations

import json

import pytest
import torch

from edgepack import cli
from edgepack.cli import plan as plan_cli
from edgepack.plan.profile import load_profile


@pytest.mark.parametrize(
    ("profile", "quant_type", "want"),
    [("gtx1650-4gb", "nf4", "float16"), ("t4", "nf4", "float16"), ("rtx3060-12gb", "nf4", "bfloat16"),
     ("rpi5-8gb", "int4", "bfloat16"), ("t4", "int4", "bfloat16")],
)
def test_storage_dtype_follows_the_profiles_bf16(profile, quant_type, want):
    assert plan_cli.storage_dtype(load_profile(profile), quant_type) == want


def test_pack_for_a_no_bf16_profile_writes_float16(tiny_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from edgepack import runtime
    from edgepack.export import quantize
    from edgepack.export.pack import CHECK_PROMPT

    out = tmp_path / "fp16"
    assert cli.main(["pack", str(tiny_models["llama"]), "-o", str(out), "--profile", "gtx1650-4gb", "--bits", "8", "-q"]) == 0
    manifest = json.loads((out / "edgepack.json").read_text())
    q = manifest["quantization"]
    assert (q["bits"], q["storage_dtype"], q["compute_dtype"]) == (8, "float16", "float16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert manifest["plan"]["weight_bytes"] == manifest["memory"]["weight_bytes"]
    quantized = set(q["quantized_modules"])
    kept = {n: t["dtype"] for n, t in manifest["tensors"].items() if n.rsplit(".", 1)[0] not in quantized}
    assert kept and set(kept.values()) == {"F16"}  # embeddings, norms: float16
    stored = {t["dtype"] for n, t in manifest["tensors"].items() if n.rsplit(".", 1)[0] in quantized}
    assert stored == {"I8", "F32"}  # int8 codes, float32 row absmax (SCB), as bitsandbytes stores them
    source = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]), dtype=torch.float32).eval()
    lm = runtime.load(out, device="cpu", backend="torch")
    ids = lm.tokenizer.encode(CHECK_PROMPT)
    with torch.inference_mode():
        got, want = quantize.logits(lm.model, ids), source(input_ids=torch.tensor([ids])).logits[0]
    # 8-bit rows plus float16 rounding over 2 layers: 2.1% measured; a wrong dtype or scale is ~100%
    assert float((got - want).norm() / want.norm()) < 0.06
    assert manifest["verification"]["top1_agreement_vs_source"] >= 0.9


def test_an_explicit_dtype_wins_over_the_profile(tiny_models, tmp_path):
    out = tmp_path / "bf16"
    assert cli.main(["pack", str(tiny_models["llama"]), "-o", str(out), "--profile", "t4", "--bits", "16",
                     "--dtype", "bfloat16", "-q"]) == 0
    manifest = json.loads((out / "edgepack.json").read_text())
    assert manifest["quantization"]["storage_dtype"] == "bfloat16"
    assert {t["dtype"] for t in manifest["tensors"].values()} == {"BF16"}
