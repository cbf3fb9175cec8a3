"""Source models for the GPU check, built from configs with random weights.

No weights travel to the GPU box (the default model's 94 MB GGUF alone is over what may
travel), so each source is a transformers config at a real model's shape, random weights
written straight to a bfloat16 safetensors file (as Hub checkpoints are), and a small BPE
tokenizer trained here. Only the first few hundred token ids occur in prompts; the
embedding table and the output layer still have the real vocabulary's rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# the tokenizer and corpus every test uses (tests/tiny.py), so the GPU check and the CPU
# tests tokenize alike
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny import CORPUS, make_tokenizer  # noqa: E402

# name -> LlamaConfig fields. "smollm2-135m": HuggingFaceTB/SmolLM2-135M's config.json;
# "llama-1b": meta-llama/Llama-3.2-1B's (max_position_embeddings cut to 8192: only the
# rotary table depends on it). "tiny*": the --cpu-dry-run's stand-ins, small enough for CI.
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "tiny-wide": dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True),
}

def write_model(shape: str, folder: Path, seed: int = 0) -> Path:
    """A model folder (config.json, model.safetensors in bfloat16, tokenizer) at SHAPES[shape].

    Weights: each matrix N(0, 1/in_features) (unit gain: activations keep their scale
    through the layers, as in a trained model, instead of the near-zero logits of
    transformers' 0.02 init), norms 1. Written tensor by tensor from a meta skeleton, so a
    1B model never exists in float32 here (~2.5 GB in bfloat16, ~10 s)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in skeleton.named_parameters():  # tied tensors are listed once
        if param.dim() >= 2:
            value = torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
        else:
            value = torch.ones(param.shape)
        tensors[name] = value.to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "shape.json").write_text(json.dumps({"shape": shape, "seed": seed}) + "\n")
    return folder


def prompt_ids(tokenizer, length: int) -> list[int]:
    """``length`` token ids of English text (the corpus repeated), the first one BOS."""
    text = " ".join(CORPUS)
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < length:
        ids = ids + ids
    return [tokenizer.bos_token_id] + ids[: length - 1]
