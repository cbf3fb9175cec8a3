"""What a model family adds to the plain Llama layer, read from its config.json for the C engine
(engine.h's Model and Layer feature fields, csrc/family.c).

| family      | what it adds                                                                |
|-------------|-----------------------------------------------------------------------------|
| Llama 3.x   | ``llama3`` rope scaling: per-frequency inverse frequencies                  |
| Qwen3       | RMSNorm of each q and k head before rotary; explicit head_dim              |
| SmolLM3     | no rotary on the layers ``no_rope_layers`` marks 0                          |
| Mistral     | sliding-window attention on every layer                                     |
| Gemma 2     | ``(1 + w)`` norms, norms of the attention and MLP outputs, tanh-GELU,       |
|             | embeddings x sqrt(hidden), query_pre_attn_scalar, soft-capped scores and   |
|             | logits, alternating sliding-window layers                                   |
| Gemma 3     | as Gemma 2 without the caps, with QK-norm and a second rotary base for the |
|             | sliding-window layers                                                       |
| Phi-3 /     | rotary over the first ``partial_rotary_factor`` of each head (Phi-4-mini:   |
| Phi-4-mini  | 0.75); ``longrope``: short and long factors, cos and sin times an attention |
|             | factor; a sliding window on every layer where config.json sets one. Its     |
|             | fused qkv_proj and gate_up_proj are the engine's own fused layout: the      |
|             | loader reads them as stored (engine/__init__.py)                            |

A rotary table is ``rot_dim / 2`` inverse frequencies (``rot_dim``: head_dim, or its rotated part), computed here as transformers'
rope initialisation does (its float32 steps rounded the same way); a plain Llama hands the C
engine none and it builds its one table from ``rope_theta``, as before this module.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

ACT_SILU, ACT_GELU_TANH = 0, 1  # engine.h
GEMMA = ("gemma2", "gemma3_text")
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3")
# Phi3Config's default where config.json lacks original_max_position_embeddings (transformers
# reads this one, not the rope parameters' copy: standardize_rope_params)
PHI3_ORIGINAL_MAX = 4096
ACTIVATIONS = {"silu": ACT_SILU, "gelu_pytorch_tanh": ACT_GELU_TANH}


@dataclass
class Features:
    """engine.h's feature fields, and how the loader treats the bundle's norms."""

    embed_scale: float = 1.0
    attn_scale: float = 0.0  # 0: 1 / sqrt(head_dim)
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    act: int = ACT_SILU
    window: int = 0
    inv_freq: list[list[float]] = field(default_factory=list)  # empty: one table from rope_theta (in C)
    layer_rope: list[int] = field(default_factory=list)  # table per layer, -1: no rotary
    layer_sliding: list[bool] = field(default_factory=list)
    norm_offset: float = 0.0  # Gemma's (1 + w): added to every stored norm weight at load
    qk_norm: bool = False
    sandwich: bool = False  # pre/post_feedforward_layernorm, post_attention_layernorm on the output
    rot_dim: int = 0  # leading dims of each head that rotate; 0: all (head_dim)
    rope_mult: float = 1.0  # cos and sin times it (longrope's attention factor)
    long_from: int = 0  # longrope: a call reaching this position uses long_inv_freq; 0: never
    long_inv_freq: list[list[float]] = field(default_factory=list)  # one per inv_freq table

    @property
    def plain(self) -> bool:
        """Nothing beyond the plain Llama layer: new() gets no features, and makes its one
        rotary table from rope_theta."""
        return not self.inv_freq and self == Features(layer_rope=[0] * len(self.layer_rope),
                                                      layer_sliding=[False] * len(self.layer_sliding))

    def c_tuple(self, head_dim: int) -> tuple:
        """(embed_scale, attn_scale, attn_softcap, final_softcap, act, window, n_ropes, rot_dim,
        rope_mult, long_from, freqs) for new(); ``freqs`` is the float32 buffer of the tables,
        the long set after the short one (the caller keeps it alive until new() has copied it)."""
        rot_dim = self.rot_dim or head_dim
        freqs = array("f", [v for table in self.inv_freq + self.long_inv_freq for v in table])
        assert all(len(t) == rot_dim // 2 for t in self.inv_freq + self.long_inv_freq)
        assert len(self.long_inv_freq) == (len(self.inv_freq) if self.long_from else 0)
        return (self.embed_scale, self.attn_scale, self.attn_softcap, self.final_softcap, self.act, self.window,
                len(self.inv_freq), rot_dim, self.rope_mult, self.long_from, freqs)


def _f32(v: float) -> float:
    return array("f", [v])[0]


def default_inv_freq(theta: float, dim: int) -> list[float]:
    """1 / theta^(2i / dim) with float32 steps, as transformers' default rope init."""
    return [_f32(1.0 / _f32(theta ** _f32(_f32(2 * i) / dim))) for i in range(dim // 2)]


def _llama3_inv_freq(rope: dict, theta: float, dim: int, config: dict) -> list[float]:
    """transformers' _compute_llama3_parameters: long wavelengths divided by ``factor``, short
    ones kept, the band between blended."""
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope.get("original_max_position_embeddings") or config["original_max_position_embeddings"])
    out = []
    for inv in default_inv_freq(theta, dim):
        wavelen = 2 * math.pi / inv
        scaled = inv / factor if wavelen > old / low else inv
        if not (wavelen < old / high) and not (wavelen > old / low):
            smooth = (old / wavelen - low) / (high - low)
            scaled = (1 - smooth) * scaled / factor + smooth * scaled
        out.append(_f32(scaled))
    return out


def _rope_kind(rope: dict) -> str:
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    return "longrope" if kind in ("su", "yarn") and "short_factor" in rope else kind  # Phi-3's older names


def _longrope(rope: dict, config: dict, dim: int, theta: float, long: bool) -> list[float]:
    """transformers' _compute_longrope_parameters: 1 / (factor_i x theta^(2i / dim)), the short
    or long factors, float32 steps as there."""
    factors = rope["long_factor" if long else "short_factor"]
    if not isinstance(factors, list) or len(factors) != dim // 2:
        raise ValueError(f"longrope's factors are not {dim // 2} numbers")
    shape = [_f32(_f32(2 * i) / dim) for i in range(dim // 2)]
    return [_f32(1.0 / _f32(_f32(float(e)) * _f32(theta**s))) for e, s in zip(factors, shape)]


def longrope_scaling(rope: dict, config: dict) -> tuple[int, float]:
    """(original_max_position_embeddings, attention factor) of a longrope model, as
    transformers reads them: the top-level original max first (Phi-3 keeps it there), the
    factor max_position_embeddings / that where the rope parameters give none, and the
    attention factor sqrt(1 + ln(factor) / ln(original max)) where they give none."""
    original = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    if not original:
        original = PHI3_ORIGINAL_MAX if config.get("model_type") == "phi3" else config["max_position_embeddings"]
    original = int(original)
    factor = rope.get("factor") or config["max_position_embeddings"] / original
    scale = rope.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return original, float(scale)


def _inv_freq(rope: dict, config: dict, dim: int) -> list[float] | str:
    """One rotary table over ``dim`` dims (longrope: its short one), or why the engine cannot
    make it."""
    kind = _rope_kind(rope)
    theta = float(rope.get("rope_theta", config.get("rope_theta") or 10000.0))
    if kind == "longrope":
        return _longrope(rope, config, dim, theta, long=False)
    if kind == "default":
        return default_inv_freq(theta, dim)
    if kind == "linear":
        return [_f32(v / float(rope["factor"])) for v in default_inv_freq(theta, dim)]
    if kind == "llama3":
        return _llama3_inv_freq(rope, theta, dim, config)
    return f"rope type {kind!r}"


def _rope_params(config: dict, layer_type: str) -> dict:
    """The rope parameters of one layer type: transformers 5 keeps a dict per layer type where
    they differ (Gemma 3); older configs say rope_scaling, rope_theta and rope_local_base_freq."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and layer_type in rope and isinstance(rope[layer_type], dict):
        return rope[layer_type]
    if rope:
        return rope
    rope = dict(config.get("rope_scaling") or {})
    rope["rope_theta"] = config.get("rope_theta") or 10000.0
    if layer_type == "sliding_attention" and config.get("rope_local_base_freq"):
        rope = {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]}
    return rope


def features(config: dict[str, Any]) -> Features | str:
    """What the engine adds to run ``config``'s model, or why it cannot run it."""
    kind = config.get("model_type")
    if kind not in LLAMA_LIKE + GEMMA:
        return f"model_type {kind!r}"
    layers = config.get("num_hidden_layers")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if not isinstance(layers, int) or not isinstance(heads, int) or not isinstance(hidden, int) or heads <= 0:
        return "config.json lacks the model's dimensions"
    dim = config.get("head_dim") or hidden // heads
    f = Features()
    rotated = _rotary_dims(config, dim)
    if isinstance(rotated, str):
        return rotated
    f.rot_dim = rotated if rotated != dim else 0
    act = config.get("hidden_activation") if kind in GEMMA else config.get("hidden_act", "silu")
    if act not in ACTIVATIONS or config.get("mlp_bias"):
        return "MLP variant"
    f.act = ACTIVATIONS[act]
    types = config.get("layer_types") or ["full_attention"] * layers
    if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(set(types))}"
    if kind in ("mistral", "phi3") and config.get("sliding_window") and not config.get("layer_types"):
        types = ["sliding_attention"] * layers  # Mistral's and Phi-3's window applies to every layer
    f.layer_sliding = [t == "sliding_attention" for t in types]
    if any(f.layer_sliding):
        window = config.get("sliding_window")
        if not isinstance(window, int) or window <= 0:
            return "sliding-window layers without a sliding_window"
        f.window = window
    tables: dict[tuple, int] = {}
    params: dict[int, dict] = {}  # each table's rope parameters
    for t in types:
        rope = _rope_params(config, t)
        try:
            table = _inv_freq(rope, config, rotated)
        except (KeyError, TypeError, ValueError) as exc:
            return f"rope parameters the engine cannot read ({type(exc).__name__}: {exc})"
        if isinstance(table, str):
            return table
        f.layer_rope.append(tables.setdefault(tuple(table), len(tables)))
        params.setdefault(f.layer_rope[-1], rope)
    f.inv_freq = [list(t) for t in tables]
    why = _long_tables(f, [params[i] for i in range(len(tables))], config, rotated)
    if why is not None:
        return why
    if kind == "smollm3":
        use = config.get("no_rope_layers") or [1] * layers
        if len(use) != layers:
            return "no_rope_layers does not list every layer"
        f.layer_rope = [r if u else -1 for r, u in zip(f.layer_rope, use)]
    f.qk_norm = kind in ("qwen3", "gemma3_text")
    if kind in GEMMA:
        f.norm_offset, f.sandwich = 1.0, True
        f.embed_scale = _f32(math.sqrt(hidden))
        f.attn_scale = float(config.get("query_pre_attn_scalar") or dim) ** -0.5
        f.attn_softcap = float(config.get("attn_logit_softcapping") or 0.0)
        f.final_softcap = float(config.get("final_logit_softcapping") or 0.0)
    if len(tables) == 1 and _is_default(config, f.inv_freq[0], dim):
        bare = Features(act=f.act, layer_rope=[0] * layers, layer_sliding=[False] * layers)
        if f == Features(**{**bare.__dict__, "inv_freq": f.inv_freq}):
            return bare  # rope_theta's one table, made in C: the plain Llama path
    return f


def _rotary_dims(config: dict, dim: int) -> int | str:
    """The leading dims of each head that rotate: all, or (Phi-3 / Phi-4-mini, as transformers'
    phi3 apply_rotary_pos_emb) int(head_dim x partial_rotary_factor)."""
    rope = _rope_params(config, "full_attention")
    factor = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0) or 1.0)
    if factor == 1.0:
        return dim
    rotated = int(dim * factor)
    if config.get("model_type") != "phi3" or not 0 < factor < 1 or rotated < 2 or rotated % 2:
        return "partial rotary embedding"
    return rotated


def _long_tables(f: Features, params: list[dict], config: dict, dim: int) -> str | None:
    """longrope's long tables, its switch and attention factor into ``f``; why not, if the
    engine cannot run its rope."""
    kinds = {_rope_kind(p) for p in params}
    if "longrope" not in kinds:
        return None
    if kinds != {"longrope"}:
        return "longrope beside other rope types"
    try:
        scaling = {longrope_scaling(p, config) for p in params}
        if len(scaling) != 1:
            return "longrope with different original lengths or factors per layer type"
        (f.long_from, f.rope_mult), = scaling
        theta = [float(p.get("rope_theta", config.get("rope_theta") or 10000.0)) for p in params]
        f.long_inv_freq = [_longrope(p, config, dim, t, long=True) for p, t in zip(params, theta)]
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return f"rope parameters the engine cannot read ({type(exc).__name__}: {exc})"
    if f.long_from <= 0:
        return "longrope without an original_max_position_embeddings"
    return None


def _is_default(config: dict, table: list[float], dim: int) -> bool:
    rope = _rope_params(config, "full_attention")
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    return kind == "default" and table == default_inv_freq(float(rope.get("rope_theta", config.get("rope_theta") or 10000.0)), dim)
