"""The exporter's reference models: same logits as transformers, without float32 copies of
the vocabulary tables."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model


@pytest.mark.parametrize("kind", ["llama", "llama-untied", "gpt2"])
def test_reference_keeps_tables_16bit_and_matches_transformers(kind):
    from edgepack.quantize import Settings, quantize_model
    from edgepack.reference import UpcastEmbedding, UpcastLinear, dequantized_model

    model = make_model(kind, 300)
    settings = Settings(16)
    result = quantize_model(model, settings, lambda _m: None)
    ref = dequantized_model(model.config, result, settings)
    embed, head = ref.get_input_embeddings(), ref.get_output_embeddings()
    assert isinstance(embed, UpcastEmbedding) and isinstance(head, UpcastLinear)
    assert embed.weight.dtype == head.weight.dtype == torch.bfloat16
    assert (head.weight.data_ptr() == embed.weight.data_ptr()) == (kind != "llama-untied")  # tied: one table
    rounded = make_model(kind, 300)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, rounded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_upcast_linear_in_row_blocks_equals_one_matmul(monkeypatch):
    from edgepack.reference import UpcastLinear

    monkeypatch.setattr(UpcastLinear, "ROWS", 7)
    w, x = torch.randn(30, 8).bfloat16(), torch.randn(2, 3, 8)
    assert torch.allclose(UpcastLinear(w)(x), x @ w.float().T, atol=1e-6)
