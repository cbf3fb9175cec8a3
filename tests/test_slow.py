"""Slow tier: the real default model, SmolLM2-135M-Instruct (installed from PyPI by
`.ci/setup`). Select with `pytest -m slow`; CI runs it too."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from edgepack.export.pack import pack

    root = tmp_path_factory.mktemp("smollm2")
    return {bits: (root / f"b{bits}", pack("smollm2-135m", root / f"b{bits}", bits=bits)) for bits in (8, 4)}


def test_default_model_packs_at_8_and_4_bits(smollm2):
    for bits, (_bundle, manifest) in smollm2.items():
        q, v, arch = manifest["quantization"], manifest["verification"], manifest["architecture"]
        assert q["bits"] == bits and len(q["quantized_modules"]) == 30 * 7
        assert arch["model_type"] == "llama" and arch["num_hidden_layers"] == 30
        assert manifest["source"]["alias"] == "smollm2-135m" and len(manifest["source"]["sha256"]) == 64
        assert v["tensors_bit_identical"] and v["logits_rel_error_vs_reference"] < 0.05
        # 8-bit stays close to the source; 4-bit drifts more but must not be garbage
        assert v["top1_agreement_vs_source"] >= (0.85 if bits == 8 else 0.6)
    w8, w4 = smollm2[8][1]["memory"]["weight_bytes"], smollm2[4][1]["memory"]["weight_bytes"]
    # 106M quantized weights + the 28M-entry embedding: at 8 bits an 8-bit table with a float16
    # scale per 32 (the default where the engine runs the model), ~137 MB; at 4 bits (nf4, the
    # torch backend's format) a bfloat16 table, ~116 MB
    assert smollm2[8][1]["quantization"]["tables"]["scheme"] == "int8-block32"
    assert 130e6 < w8 < 145e6 and 100e6 < w4 < 125e6


def test_chat_answers_paris_at_8_bits(smollm2):
    bundle = smollm2[8][0]
    out = subprocess.run(
        [sys.executable, "-m", "edgepack.cli", "run", str(bundle), "--chat", "What is the capital of France?",
         "--temperature", "0", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_4bit_answers_sensibly(smollm2):
    import edgepack

    lm = edgepack.load(smollm2[4][0])
    answer = lm.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24, temperature=0)
    assert "Paris" in answer


def test_int4_on_the_default_model(tmp_path):
    """edgepack's CPU int4 on the real model: close to the source (which is itself a Q4_1
    GGUF, so 32-wide affine groups land near its grid), and it answers."""
    import edgepack
    from edgepack.export.pack import pack

    manifest = pack("smollm2-135m", tmp_path / "int4", bits=4, quant_type="int4")
    q, v = manifest["quantization"], manifest["verification"]
    assert (q["method"], q["quant_type"], len(q["quantized_modules"])) == ("edgepack", "int4", 30 * 7)
    assert v["tensors_bit_identical"] and v["logits_rel_error_vs_reference"] < 0.05
    assert v["top1_agreement_vs_source"] >= 0.9
    lm = edgepack.load(tmp_path / "int4")
    answer = lm.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24, temperature=0)
    assert "Paris" in answer
