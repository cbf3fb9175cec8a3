"""The config numbers of a Llama-family GGUF file, read from its header alone.

transformers reads a GGUF config through gguf-py's reader, which decodes every metadata
field (SmolLM2's 49,152 tokenizer strings: ~20 s on a loaded 2-core box) and imports torch.
The planner needs ten numbers, so this skips the arrays it does not need and reads the
same keys transformers maps (transformers.integrations.ggml.GGUF_CONFIG_MAPPING["llama"]).
Standard library only.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # 64-bit counts and lengths (version 1 used 32-bit ones)
# GGUF value types: struct format of each scalar; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# llama.<key> -> the transformers config key
_LLAMA_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim", "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size",
}
REQUIRED = ("max_position_embeddings", "num_hidden_layers", "intermediate_size", "hidden_size",
            "num_attention_heads", "vocab_size")


def llama_config(path: str | Path) -> dict[str, Any] | None:
    """config.json's numbers for a GGUF file of architecture "llama" (model_type "mistral"
    when general.name says so, as transformers decides), or None for any other file: the
    caller then asks transformers."""
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            return None
        version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version not in VERSIONS:
            return None
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            kind = _u32(f)
            wanted = key in ("general.architecture", "general.name") or key.startswith("llama.")
            if key == "tokenizer.ggml.tokens" and kind == _ARRAY:
                meta[key] = _array_length(f)
            elif wanted:
                meta[key] = _value(f, kind)
            else:
                _skip(f, kind)
        names = {_tensor_name(f) for _ in range(n_tensors)}
    if meta.get("general.architecture") != "llama":
        return None
    config: dict[str, Any] = {"model_type": "llama"}
    if "mistral" in str(meta.get("general.name", "")):
        config["model_type"] = "mistral"
    for key, name in _LLAMA_KEYS.items():
        if f"llama.{key}" in meta:
            config[name] = meta[f"llama.{key}"]
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in meta:
        config["vocab_size"] = meta["tokenizer.ggml.tokens"]
    config["tie_word_embeddings"] = "output.weight" not in names
    return config if all(k in config for k in REQUIRED) else None


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", f.read(4))[0]


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", f.read(8))[0]


def _string(f: BinaryIO) -> str:
    return f.read(_u64(f)).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, n = _u32(f), _u64(f)
        return [_value(f, item) for _ in range(n)]
    fmt = _SCALARS[kind]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _array_length(f: BinaryIO) -> int:
    item, n = _u32(f), _u64(f)
    for _ in range(n):
        _skip(f, item)
    return n


def _skip(f: BinaryIO, kind: int) -> None:
    if kind == _STRING:
        f.seek(_u64(f), 1)
    elif kind == _ARRAY:
        item, n = _u32(f), _u64(f)
        if item in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[item]), 1)
        else:
            for _ in range(n):
                _skip(f, item)
    else:
        f.seek(struct.calcsize(_SCALARS[kind]), 1)


def _tensor_name(f: BinaryIO) -> str:
    name = _string(f)
    n_dims = _u32(f)
    f.seek(8 * n_dims + 4 + 8, 1)  # dims, ggml type, data offset
    return name
