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


def _header_counts(f) -> tuple[int, int] | None:
    """(tensors, metadata keys) from a GGUF v2/v3 file's first 24 bytes; None for any other file."""
    if f.read(4) != MAGIC:
        return None
    version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
    return (n_tensors, n_kv) if version in VERSIONS else None


def llama_config(path: str | Path) -> dict[str, Any] | None:
    """config.json's numbers for a GGUF file of architecture "llama" (model_type "mistral"
    when general.name says so, as transformers decides), or None for any other file: the
    caller then asks transformers."""
    with open(path, "rb") as f:
        if (counts := _header_counts(f)) is None:
            return None
        n_tensors, n_kv = counts
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


def tensor_types(path: str | Path) -> dict[str, int] | None:
    """Elements stored at each ggml type (its name: "Q4_1", "F16", ...) over the file's
    2-D weight matrices, read from the header; None for a file that is not GGUF v2/v3."""
    with open(path, "rb") as f:
        if (counts := _header_counts(f)) is None:
            return None
        n_tensors, n_kv = counts
        for _ in range(n_kv):
            _string(f)
            _skip(f, _u32(f))
        counts: dict[str, int] = {}
        for _ in range(n_tensors):
            _string(f)
            n_dims = _u32(f)
            shape = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
            kind = _u32(f)
            f.seek(8, 1)  # data offset
            if n_dims == 2:
                name = GGML_TYPES.get(kind, f"type {kind}")
                counts[name] = counts.get(name, 0) + shape[0] * shape[1]
    return counts


# ggml's tensor types (ggml.h, enum ggml_type) -> name; the bits of each are source.py's
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
              18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
              25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0"}


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
