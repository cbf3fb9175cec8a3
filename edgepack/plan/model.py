"""What the planner knows of a model: per-block tensor sizes and config numbers.

    from edgepack.plan.model import describe_model
    desc = describe_model(config)  # config.json's dict, or a transformers config

A Llama-family config (llama, mistral, qwen2) is described from its numbers alone: no
torch, no transformers, so ``edgepack plan`` answers in well under a second. Any other
architecture is built on the meta device by transformers and measured there, with the
helpers below that the exporter shares (``module_blocks``, ``is_linear``,
``unique_tensors``): the split is the exporter's (every linear layer but the output layer
quantized, everything else 16-bit, tied tensors stored once). torch is imported only
inside the functions that take a torch model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgepack.errors import UnsupportedModelError

# model types whose blocks follow from config numbers (transformers' Llama layout; qwen2
# adds biases to q, k and v)
CONFIG_ONLY_TYPES = ("llama", "mistral", "qwen2")
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
             "max_position_embeddings")


@dataclass(frozen=True)
class Block:
    """One device_map unit (embeddings, a decoder layer, the final norm, lm_head, ...).

    linears: (name, out_features, in_features) of each linear weight the exporter would
    quantize. kept_params: elements of the floating tensors stored 16-bit (embeddings,
    norms, an untied output layer); bias_params: the quantized linears' biases, 16-bit
    too. other_bytes: non-floating tensors, stored as they are. tied_to: the block whose
    weight this one shares (a tied lm_head), which must sit on the same device.
    """

    name: str
    kind: str = "other"  # embedding | layer | norm | rotary | output | other
    linears: tuple[tuple[str, int, int], ...] = ()
    kept_params: int = 0
    bias_params: int = 0
    other_bytes: int = 0
    tied_to: str | None = None
    # the embedding table / an untied output layer in this block (part of kept_params):
    # its [rows, cols], which an 8-bit table stores as int8 + its scales (sizing.table_bytes)
    table_rows: int = 0
    table_cols: int = 0

    @property
    def linear_params(self) -> int:
        return sum(o * i for _, o, i in self.linears)


@dataclass(frozen=True)
class ModelDescription:
    name: str
    model_type: str
    blocks: tuple[Block, ...]
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    lean: bool = False  # edgepack's lean CPU decoder runs this architecture
    engine: bool = False  # edgepack's C engine runs it (every lean architecture, and engine/family.py's)
    sliding_layers: int = 0  # layers attending to the last sliding_window positions only
    sliding_window: int = 0

    @property
    def num_parameters(self) -> int:
        return sum(b.kept_params + b.bias_params + b.linear_params for b in self.blocks)

    @property
    def qkv_width(self) -> int:
        """Outputs of the attention's q, k and v projections together."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def gated_mlp(self) -> bool:
        """Llama-style gate/up/down (two intermediate-wide outputs) vs GPT-2's fc/proj."""
        layer = next((b for b in self.blocks if b.kind == "layer"), None)
        return layer is not None and sum(o == self.intermediate_size for _, o, _ in layer.linears) >= 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [asdict(b) for b in self.blocks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelDescription:
        blocks = tuple(
            Block(**{**b, "linears": tuple(tuple(x) for x in b.get("linears", ()))}) for b in d["blocks"]
        )
        return cls(**{**d, "blocks": blocks})




# --- describing a model ------------------------------------------------------------------------


def describe_model(config: Any, name: str | None = None) -> ModelDescription:
    """Per-block tensor sizes of the model ``config`` describes: config.json's dict or a
    transformers config. Llama-family dicts are described from their numbers; the rest is
    built on the meta device (this imports torch and transformers)."""
    if isinstance(config, dict):
        if config_only(config):
            return _describe_llama(config, name)
        from transformers import AutoConfig

        fields = {k: v for k, v in config.items() if k != "model_type"}
        config = AutoConfig.for_model(config.get("model_type", ""), **fields)
    return _describe_meta(config, name)


def config_only(config: dict[str, Any]) -> bool:
    """Whether ``describe_model`` can describe this config.json without torch."""
    return config.get("model_type") in CONFIG_ONLY_TYPES and all(config.get(k) for k in _REQUIRED)


def _describe_llama(c: dict[str, Any], name: str | None) -> ModelDescription:
    hidden, inter, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    qkv_bias = c["model_type"] == "qwen2" or bool(c.get("attention_bias"))
    o_bias = c["model_type"] != "qwen2" and bool(c.get("attention_bias"))
    mlp_bias = c["model_type"] == "llama" and bool(c.get("mlp_bias"))
    linears = (("self_attn.q_proj", heads * head_dim, hidden), ("self_attn.k_proj", kv_heads * head_dim, hidden),
               ("self_attn.v_proj", kv_heads * head_dim, hidden), ("self_attn.o_proj", hidden, heads * head_dim),
               ("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden), ("mlp.down_proj", hidden, inter))
    bias = sum(o for n, o, _ in linears[:3]) * qkv_bias + hidden * o_bias + (2 * inter + hidden) * mlp_bias
    tied = bool(c.get("tie_word_embeddings", False))
    vocab = c["vocab_size"]
    layers = [Block(f"model.layers.{i}", "layer", linears, 2 * hidden, bias) for i in range(c["num_hidden_layers"])]
    blocks = (
        Block("model.embed_tokens", "embedding", kept_params=vocab * hidden, table_rows=vocab, table_cols=hidden),
        *layers,
        Block("model.norm", "norm", kept_params=hidden),
        Block("model.rotary_emb", "rotary"),
        Block("lm_head", "output", tied_to="model.embed_tokens") if tied
        else Block("lm_head", "output", kept_params=vocab * hidden, table_rows=vocab, table_cols=hidden),
    )
    return ModelDescription(
        name=name or c.get("_name_or_path") or c["model_type"], model_type=c["model_type"], blocks=blocks,
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, hidden_size=hidden, intermediate_size=inter, vocab_size=vocab,
        max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=tied, lean=_lean_supported(c),
        **_engine_features(c),
    )


def _describe_meta(config, name: str | None) -> ModelDescription:
    import torch
    from transformers import AutoModelForCausalLM

    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise UnsupportedModelError(
            f"{config.model_type!r} models are not causal language models transformers can generate with",
            hint="edgepack packs decoder-only LMs (Llama, GPT-2, Qwen, Mistral, Phi, ...)",
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = module_blocks(model)
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = output is not None and output.weight is embeddings.weight
    module_names = {m: n for n, m in model.named_modules()}
    output_name, embeddings_name = module_names.get(output), module_names.get(embeddings)
    linears = {n: m for n, m in model.named_modules() if is_linear(m) and m is not output}
    sizes: dict[str, dict[str, Any]] = {n: _empty_sizes() for n in names}
    for key, tensor in unique_tensors(model):
        owner, _, attr = key.rpartition(".")
        block = _block_of(key, names)
        entry = sizes.setdefault(block, _empty_sizes())
        if owner in linears and attr == "weight":
            out_f, in_f = out_in(linears[owner])
            entry["linears"].append((owner[len(block) + 1 :], out_f, in_f))
        elif owner in linears and attr == "bias":
            entry["bias_params"] += tensor.numel()
        elif tensor.is_floating_point():
            entry["kept_params"] += tensor.numel()
        else:
            entry["other_bytes"] += tensor.numel() * tensor.element_size()
    blocks = []
    for block_name, entry in sizes.items():
        kind = _kind(block_name, model, output_name, embeddings_name)
        tied_to = embeddings_name if tied and block_name == output_name else None
        table = {output_name: output, embeddings_name: embeddings}.get(block_name) if not tied_to else None
        shape = tuple(table.weight.shape) if table is not None and getattr(table, "weight", None) is not None else ()
        rows, cols = shape if len(shape) == 2 else (0, 0)
        blocks.append(Block(block_name, kind, tuple(entry["linears"]), entry["kept_params"],
                            entry["bias_params"], entry["other_bytes"], tied_to, rows, cols))
    summary = architecture_summary(model)
    return ModelDescription(
        name=name or getattr(config, "name_or_path", "") or config.model_type,
        model_type=config.model_type,
        blocks=tuple(blocks),
        num_hidden_layers=summary["num_hidden_layers"],
        num_attention_heads=summary["num_attention_heads"],
        num_key_value_heads=summary["num_key_value_heads"],
        head_dim=summary["head_dim"],
        hidden_size=summary["hidden_size"],
        intermediate_size=summary["intermediate_size"] or getattr(config, "n_inner", None) or 4 * summary["hidden_size"],
        vocab_size=summary["vocab_size"],
        max_position_embeddings=summary["max_position_embeddings"],
        tie_word_embeddings=tied,
        lean=_lean_supported(config.to_dict()),
        **_engine_features(config.to_dict()),
    )


def _empty_sizes() -> dict[str, Any]:
    return {"linears": [], "kept_params": 0, "bias_params": 0, "other_bytes": 0}


def _block_of(key: str, names: list[str]) -> str:
    match = [n for n in names if key.startswith(n + ".")]
    return max(match, key=len) if match else key.split(".")[0]


def _kind(block: str, model, output_name: str | None, embeddings_name: str | None) -> str:
    if block == output_name:
        return "output"
    if block == embeddings_name:
        return "embedding"
    if block.rpartition(".")[2].isdigit():
        return "layer"
    if "rotary" in block:
        return "rotary"
    module = model.get_submodule(block)
    return "norm" if "norm" in type(module).__name__.lower() else "other"


def _lean_supported(config: dict[str, Any]) -> bool:
    """Whether edgepack's Llama decoders (the C engine, the torch one) run it, else the
    runtime uses transformers."""
    from edgepack.runtime.engine import supports  # no torch

    return supports(config) is None


def engine_runs(config: dict[str, Any]) -> bool:
    """Whether edgepack's C engine runs a model of this config.json (pack's default tables)."""
    return _engine_features(config)["engine"]


def _engine_features(config: dict[str, Any]) -> dict[str, Any]:
    """Whether edgepack's C engine runs it, and its sliding-window layers (their KV cache is a
    ring of sliding_window positions there)."""
    from edgepack.runtime.engine.family import features  # no torch

    found = features(config)
    if isinstance(found, str):
        return {"engine": False}
    return {"engine": True, "sliding_layers": sum(found.layer_sliding), "sliding_window": found.window}


# --- a torch model's structure (shared with the exporter) ---------------------------------------


def is_linear(module) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def out_in(module) -> tuple[int, int]:
    """(out, in) as bitsandbytes stores it; GPT-2's Conv1D keeps its weight as [in, out]."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if type(module).__name__ == "Conv1D" else (w.shape[0], w.shape[1])


def unique_tensors(model):
    """(key, tensor) of the model's state dict, each tensor once: a tied weight (the same
    parameter under two names, e.g. lm_head.weight) is stored under its first name only."""
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield key, tensor


def module_blocks(model) -> list[str]:
    """The units a device_map places, in forward order: each decoder layer, and every other
    top-level piece that holds tensors (embeddings, final norm, rotary tables, lm_head)."""
    from torch import nn

    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    layers_name = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))[0] if lists else None
    blocks: list[str] = []

    def holds_tensors(module) -> bool:
        return any(True for _ in module.parameters()) or any(True for _ in module.buffers())

    def visit(prefix: str, module) -> None:
        for child_name, child in module.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            if full == layers_name:
                blocks.extend(f"{full}.{i}" for i in range(len(child)))
            elif layers_name and layers_name.startswith(full + "."):
                visit(full, child)
            elif holds_tensors(child):
                blocks.append(full)

    visit("", model)
    return blocks


def architecture_summary(model) -> dict[str, Any]:
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    return {
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None),
        "vocab_size": getattr(config, "vocab_size", None),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }
