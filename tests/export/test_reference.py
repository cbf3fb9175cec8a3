"""The exporter's reference models: same logits as transformers, without float32 copies of
the vocabulary tables."""

from __future__ import annotations

import pytest
import torch

from tiny import make_model
from families import FAMILIES, make_family_model


@pytest.mark.parametrize("kind", ["llama", "llama-untied", "gpt2"])
def test_reference_keeps_tables_16bit_and_matches_transformers(kind):
    from edgepack.export.quantize import Settings, quantize_model
    from edgepack.export.reference import dequantized_model
    from edgepack.export.streamed import UpcastEmbedding, UpcastLinear

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


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_and_lazy_source_match_transformers_per_family(family):
    """Both reference models compute what transformers' float32 forward does, past the
    sliding window, for every family: Gemma's embedding is scaled by sqrt(hidden_size) inside
    its embedding module, which the 16-bit table must keep (without it, 17-97% apart)."""
    from edgepack.export import reference, streamed
    from edgepack.export.quantize import Settings, quantize_model

    settings = Settings(16)
    result = quantize_model(make_family_model(family, 300), settings, lambda _m: None)
    ref = reference.dequantized_model(make_family_model(family, 300).config, result, settings)
    rounded, source = make_family_model(family, 300), make_family_model(family, 300)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    linears = {n for n, m in source.named_modules() if isinstance(m, torch.nn.Linear)}
    lazy = reference.lazy_source_model(source.config, state.__getitem__, linears, list(state))
    assert isinstance(ref.get_input_embeddings(), streamed.UpcastEmbedding)  # no float32 table
    ids = torch.tensor([list(range(3, 23))])  # 20 tokens: past the window of 8
    with torch.no_grad():
        for got, want in ((ref, rounded), (lazy, source)):
            a, b = got(input_ids=ids).logits, want(input_ids=ids).logits
            assert float((a - b).norm() / b.norm()) < 1e-4


def test_embedding_with_an_unknown_forward_is_not_replaced():
    """An embedding module whose forward does something UpcastEmbedding does not know
    keeps its own forward (its table upcast whole), rather than silently losing that step."""
    from edgepack.export.streamed import _embedding_scale

    class Shifted(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    assert _embedding_scale(torch.nn.Embedding(4, 2)) == (True, None)
    assert _embedding_scale(Shifted(4, 2)) == (False, None)


def test_upcast_linear_in_row_blocks_equals_one_matmul(monkeypatch):
    from edgepack.export.streamed import UpcastLinear

    monkeypatch.setattr(UpcastLinear, "ROWS", 7)
    w, x = torch.randn(30, 8).bfloat16(), torch.randn(2, 3, 8)
    assert torch.allclose(UpcastLinear(w)(x), x @ w.float().T, atol=1e-6)


def test_lazy_source_reads_linear_weights_per_call_unless_pinned():
    """A streamed source's linears are read on every call (one weight alive at a time);
    inside pinned(block) each is read once for any number of calls, then dropped again."""
    from edgepack.export import streamed

    model = make_model("llama", 300)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    reads: list[str] = []

    def read(key):
        reads.append(key)
        return state[key]

    lazy = streamed.lazy_source_model(model.config, read, linears, list(state))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids).logits
        reads.clear()
        lazy(ids)
        lazy(ids)
        q = "model.layers.0.self_attn.q_proj.weight"
        assert reads.count(q) == 2
        reads.clear()
        block = lazy.model.layers[0]
        with streamed.pinned(block):
            for _ in range(3):
                got = lazy(ids).logits
        assert reads.count(q) == 1 and reads.count("model.layers.1.self_attn.q_proj.weight") == 3
        assert block.self_attn.q_proj.weight.device.type == "meta"  # dropped after
        assert torch.allclose(got, expected, atol=1e-5)
