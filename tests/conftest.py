"""Shared fixtures: tiny models built from configs, a tokenizer trained at test time, and
bundles packed from them. Nothing here touches the network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# helpers imported by name: conftest's builders from tests/, the fake Hub from tests/hub/ (cli tests use it too)
sys.path.insert(0, str(Path(__file__).parent / "hub"))
sys.path.insert(0, str(Path(__file__).parent))

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Water boils at one hundred degrees, and the quick brown fox jumps over the lazy dog.",
    "Small boxes run small models: a Raspberry Pi, a Jetson, a laptop without a GPU.",
    "Quantization stores weights in eight or four bits instead of sixteen.",
    "Ünïcödé façade — naïve café, 東京, Ελληνικά and emoji 🚀 too.",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the verified-hash records and HF caches of the tests out of the user's home."""
    cache = tmp_path_factory.mktemp("edgepack-cache")
    old = {k: os.environ.get(k) for k in ("EDGEPACK_CACHE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    os.environ.update(EDGEPACK_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(kind: str, vocab_size: int, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                            bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=(kind == "llama"), bos_token_id=1, eos_token_id=2,
        )
        model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; scale up so greedy decoding is decisive and
    # quantization error is visible but small, as in a trained model.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Local HF model directories: tiny GPT-2 (Conv1D, tied), Llama (tied) and Llama with a
    separate lm_head."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer()
    paths = {}
    for kind in ("gpt2", "llama", "llama-untied"):
        model = make_model(kind, len(tokenizer))
        path = root / kind
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[kind] = path
    return paths


_PACKED: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def packed(tiny_models, tmp_path_factory):
    """packed(kind, bits, **options) -> bundle dir, packed once per session per setting."""
    from edgepack.export.pack import pack

    root = tmp_path_factory.mktemp("bundles")

    def get(kind: str, bits: int, **options) -> Path:
        key = (kind, bits, tuple(sorted(options.items())))
        if key not in _PACKED:
            out = root / "-".join([kind, str(bits), *(f"{k}={v}" for k, v in sorted(options.items()))])
            pack(str(tiny_models[kind]), out, bits=bits, **options)
            _PACKED[key] = out
        return _PACKED[key]

    return get


@pytest.fixture
def bundle_copy(packed, tmp_path):
    """copy(kind, bits) -> a private copy of a packed bundle that a test may damage."""
    import shutil

    def copy(kind: str = "llama", bits: int = 8, **options) -> Path:
        dest = tmp_path / f"copy-{kind}-{bits}"
        shutil.copytree(packed(kind, bits, **options), dest)
        return dest

    return copy
