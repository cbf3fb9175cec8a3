"""Attention past one block of positions (engine.h: ATT_BLOCK, ATT_SPLIT, 256 each): a prompt's
online softmax over several blocks and a decode step's parts merged after the threads, on a
tiny Llama whose 700 positions span three of each. Float64's logits, on any thread count,
and batched steps bitwise one-sequence ones."""

from __future__ import annotations

import pytest
import torch

import edgepack

from test_native import _float64_logits, _logits, isa  # noqa: E402,F401  (this folder is on sys.path under pytest)

POSITIONS = 700


@pytest.fixture(scope="module")
def long_bundle(tmp_path_factory):
    """3 query heads on 1 kv head (a group of 3, as SmolLM2; one kv head, as Gemma 3 270M), head_dim 32 (AVX2's decode rows
    straight from bfloat16: a multiple of 32), 1024 positions; packed 8-bit, 16-bit tables."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny import make_tokenizer

    from edgepack.export.pack import pack

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)  # decisive logits, as in tests/tiny.py
    root = tmp_path_factory.mktemp("long")
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    pack(str(root / "hf"), root / "bundle", bits=8, table_bits=16)
    return root / "bundle"


def _ids(lm) -> list[int]:
    text = "Water boils at one hundred degrees, and ice melts at zero. Small boxes run small models. "
    return (lm.tokenizer.encode(text) * 200)[:POSITIONS]


def test_long_prompts_and_steps_match_float64(long_bundle, isa):
    lm = edgepack.load(long_bundle)
    assert lm.backend == "native"
    ids = _ids(lm)
    exact = _float64_logits(edgepack.load(long_bundle, backend="torch").model, ids)
    scale = exact.abs().max()
    for n in (255, 257, 600):  # a block less one, a block and one, two blocks and part of a third
        cache = lm.model.new_cache(POSITIONS)
        got = _logits(lm.model.forward(ids[:n], cache))
        assert (got - exact[n - 1]).abs().max() <= 1e-4 * scale, n
    # Steps over 1 to 3 parts, across both boundaries. This model's steps are up to 1.5e-4 off
    # float64 at any position (100-200 as 600-700; its float32 matrix-vector sums, with
    # attention one head at a time as well), so 2e-4 here; a wrong merge is off by far more.
    cache = lm.model.new_cache(POSITIONS)
    lm.model.forward(ids[:240], cache)
    steps = torch.stack([_logits(lm.model.forward([t], cache)) for t in ids[240:280]])
    assert (steps - exact[240:280]).abs().max() <= 2e-4 * scale
    lm.model.forward(ids[280:500], cache)
    steps = torch.stack([_logits(lm.model.forward([t], cache)) for t in ids[500:POSITIONS]])
    assert (steps - exact[500:POSITIONS]).abs().max() <= 2e-4 * scale


def test_long_context_threads_do_not_change_the_result(long_bundle):
    lm = edgepack.load(long_bundle)
    ids = _ids(lm)
    runs = []
    for threads in (1, 2, 3):
        lm.model.threads = threads
        cache = lm.model.new_cache(POSITIONS)
        prompt = _logits(lm.model.forward(ids[:600], cache))
        steps = [_logits(lm.model.forward([t], cache)) for t in ids[600:610]]
        runs.append(torch.stack([prompt, *steps]))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])  # parts cut by positions, not threads


def test_long_batched_steps_are_bitwise_one_sequence_steps(long_bundle):
    lm = edgepack.load(long_bundle)
    m, ids = lm.model, _ids(lm)
    starts = [200, 300, 520]  # 1, 2 and 3 parts, each sequence its own cache size
    alone = []
    for n in starts:
        cache = m.new_cache(n + 8)
        m.forward(ids[:n], cache)
        alone.append([bytes(m.forward([t], cache)) for t in ids[n:n + 8]])
    caches = [m.new_cache(n + 8) for n in starts]
    for n, cache in zip(starts, caches):
        m.forward(ids[:n], cache)
    together = [[] for _ in starts]
    for i in range(8):
        for seen, lg in zip(together, m.step_batch([ids[n + i] for n in starts], caches)):
            seen.append(bytes(lg))
    assert together == alone
