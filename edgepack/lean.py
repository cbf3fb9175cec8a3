"""A lean decoder for Llama-family models (Llama, Mistral without sliding window, Qwen2) on CPU.

On a 135M-parameter model the time per token goes to Python and framework overhead, not
to memory bandwidth: transformers' modules run ~40 small ops per layer and grow their KV
cache by concatenation. This module runs the same math with fewer, larger ops:

* q/k/v and gate/up projections fused into one matmul each (one int8 kernel call, not 3 or 2);
* a static KV cache allocated once for the context, written in place;
* ``F.rms_norm`` and ``scaled_dot_product_attention`` (GQA) as single ops;
* rotary tables computed once.

One-token decode steps go further where edgepack._native is built (its C source:
edgepack/runtime/engine/csrc/): the whole step in one C call over the same tensors, float32 activations, no
per-op overhead (``native_step``; ``native_off`` says why not, when not).

It reads the same tensors as the transformers path (int8 + SCB, packed 4-bit, 16-bit) and
its logits agree with transformers' to bf16 rounding (tested). Architectures or settings
it does not cover (rope scaling, sliding windows, biases it does not know) fall back to
transformers; ``supports(config)`` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgepack.memory import release_freed_memory
from edgepack.native import CPUS, NATIVE_ENV, SUPPORTED_TYPES, _native, c_module_unavailable, supports  # noqa: F401
from edgepack.qlinear import WIDE_ROWS, Int4Linear, Int8Linear, Linear4bit, wide_matmul

# Keys and values are kept in bf16: half the memory of fp32 for long contexts, and what
# the planner counts (2 bytes per value).
KV_DTYPE = torch.bfloat16
# The 16-bit head (and the embedding table it is often tied to) runs in float16 on the CPU,
# not bfloat16: the same bytes and about the same speed there, but logits rounded to 11
# significant bits instead of 8. Measured on SmolLM2-135M 8-bit: mean KL to the source
# 0.00200 -> 0.00156, top-1 agreement 0.969 -> 0.975, ~1-2% more time per decode step.
HEAD_DTYPE = torch.float16
FLOAT16_MAX = 65504.0
HALF_CHUNK = 1 << 16  # weights converted at a time (256 KiB of float32 scratch)
# Decode steps (one token) run in edgepack._native when it is built and the model's layers
# are int8, int4 or 16-bit: the whole step in one call, float32 activations, no per-op overhead.
# EDGEPACK_NATIVE=0 turns it off (torch ops, as for prompts); on CPUs without AVX2 it is off
# unless EDGEPACK_NATIVE=1 (native.c_module_unavailable). It runs on at most native.CPUS threads:
# its workers spin between the parts of a step, so more threads than CPUs would only take turns
# (torch.set_num_threads(8) on a 2-core box).


@dataclass
class Output:
    """What ``model(input_ids)`` returns, HF-style."""

    logits: torch.Tensor


class KVCache:
    """Keys and values for every layer, preallocated for ``max_tokens`` positions."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_tokens: int, dtype: torch.dtype):
        shape = (layers, 1, kv_heads, max_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_tokens = max_tokens
        self.length = 0


FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def fused_destinations(skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """Where the loader should read the tensors that ``Block`` fuses (q/k/v and gate/up rows
    of int8 and 16-bit layers): views into one buffer per group, by stored tensor name. Read
    straight into them, the parts are already joined and ``fuse`` copies nothing (before, a
    layer's fused rows were copied at load: time, and one layer's bytes on the load peak)."""
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(skeleton.model.layers):
        for owner, names in FUSED_GROUPS:
            parts = [getattr(getattr(layer, owner), n) for n in names]
            if all(isinstance(m, Int8Linear) for m in parts):
                attrs = ("weight", "SCB")
            elif all(type(m) is CastLinear for m in parts):
                attrs = ("weight",)
            else:
                continue
            for attr in attrs:
                metas = [getattr(m, attr) for m in parts]
                buffer = torch.empty(sum(t.shape[0] for t in metas), *metas[0].shape[1:], dtype=metas[0].dtype)
                row = 0
                for name, meta in zip(names, metas):
                    out[f"model.layers.{i}.{owner}.{name}.{attr}"] = buffer[row : row + meta.shape[0]]
                    row += meta.shape[0]
    return out


def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors)``, without a copy when they are consecutive rows of one buffer
    (as ``fused_destinations`` lays them out)."""
    first = tensors[0]
    storage, ptr = first.untyped_storage(), first.data_ptr()
    for t in tensors:
        same = t.dtype == first.dtype and t.shape[1:] == first.shape[1:] and t.is_contiguous()
        if not same or t.untyped_storage().data_ptr() != storage.data_ptr() or t.data_ptr() != ptr:
            return torch.cat(tensors)
        ptr += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return torch.empty(0, dtype=first.dtype).set_(storage, first.storage_offset(), (rows, *first.shape[1:]))


def fuse(parts: list[nn.Module]) -> nn.Module:
    """One layer computing all ``parts``: int8 rows and scales concatenate exactly; other
    kinds (4-bit blocks, 16-bit) are kept as a list and run one by one."""
    if all(isinstance(p, Int8Linear) for p in parts):
        fused = Int8Linear(parts[0].in_features, sum(p.out_features for p in parts), False, parts[0].compute_dtype)
        bias = [p.bias for p in parts]
        fused.attach({"weight": joined([p.weight for p in parts]), "SCB": joined([p.SCB for p in parts])})
        if all(b is not None for b in bias):
            fused.bias = nn.Parameter(torch.cat([b.data for b in bias]), requires_grad=False)
        return fused
    if all(isinstance(p, Int4Linear) and p.group == parts[0].group for p in parts) and all(p.bias is None for p in parts):
        first = parts[0]
        fused = Int4Linear(first.in_features, sum(p.out_features for p in parts), False, first.compute_dtype, first.group)
        fused.attach({
            "weight": torch.cat([p.weight for p in parts]),
            "weight.scales_and_zeros": torch.cat([p.scales_and_zeros for p in parts], dim=1),
        })
        return fused
    if all(isinstance(p, nn.Linear) for p in parts):
        fused = CastLinear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None)
        fused.weight = nn.Parameter(joined([p.weight.data for p in parts]), requires_grad=False)
        if parts[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias.data for p in parts]), requires_grad=False)
        return fused
    return _Concat(parts)


class _Concat(nn.Module):
    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def kernel(module: nn.Module):
    """The fastest call computing ``module`` on a 2-D input already in its compute dtype:
    int8/int4 layers go straight to torch's fused CPU kernel (no module call, reshape or
    cast per token); anything else is called as a module."""
    direct = getattr(module, "cpu_kernel", None)
    return (direct() if direct else None) or module


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a projection's input is cast to once, before its kernel."""
    if isinstance(module, _Concat):
        return compute_dtype(module.parts[0])
    return getattr(module, "compute_dtype", None) or module.weight.dtype


class Block(nn.Module):
    """One decoder layer on 2-D activations [tokens, hidden]: the per-token hot path, so it
    runs as few ops as it can (q and k rotated together, no per-call module dispatch for
    the quantized projections, no dtype round trips)."""

    def __init__(self, layer: nn.Module, cfg: "LeanConfig"):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_proj = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.gate_up_proj = fuse([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.cfg = cfg
        self.inter = mlp.gate_proj.out_features
        self.q_size, self.qk_size = cfg.heads * cfg.head_dim, (cfg.heads + cfg.kv_heads) * cfg.head_dim
        self._dtypes = [compute_dtype(m) for m in (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)]

    def bind(self) -> None:
        """Look up each projection's kernel, once its int4 layers are in their final layout
        (prepare_cpu or prepare_native)."""
        self._qkv, self._o = kernel(self.qkv_proj), kernel(self.o_proj)
        self._gate_up, self._down = kernel(self.gate_up_proj), kernel(self.down_proj)

    def forward(self, x, cos, sin, cache: KVCache | None, index: int, start: int, mask):
        cfg = self.cfg
        n, heads, kv_heads, dim = x.shape[0], cfg.heads, cfg.kv_heads, cfg.head_dim
        qkv_dtype, o_dtype, gate_up_dtype, down_dtype = self._dtypes
        h = F.rms_norm(x, (cfg.hidden,), self.input_norm, cfg.eps)
        qkv = self._qkv(h.to(qkv_dtype))
        # q and k rotated as one [tokens, heads + kv_heads, dim] tensor, then kept 16-bit
        qk = qkv[:, : self.qk_size].view(n, heads + kv_heads, dim)
        qk = rotate(qk, cos, sin).to(KV_DTYPE)
        q, k = qk[:, :heads].transpose(0, 1), qk[:, heads:].transpose(0, 1)
        v = qkv[:, self.qk_size :].view(n, kv_heads, dim).transpose(0, 1)
        if cache is not None:
            cache.k[index, 0, :, start : start + n] = k
            cache.v[index, 0, :, start : start + n] = v
            k, v = cache.k[index, :, :, : start + n], cache.v[index, :, :, : start + n]
        else:
            k, v = k[None], v.to(KV_DTYPE)[None]
        # attention in the cache's 16-bit dtype: no per-step upcast copy of the whole cache
        attn = F.scaled_dot_product_attention(
            q[None], k, v, attn_mask=mask, is_causal=mask is None and n > 1, enable_gqa=True
        )
        x = x + self._o(attn[0].transpose(0, 1).reshape(n, self.q_size).to(o_dtype))
        h = F.rms_norm(x, (cfg.hidden,), self.post_norm, cfg.eps)
        gate_up = self._gate_up(h.to(gate_up_dtype))
        return x + self._down((F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :]).to(down_dtype))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [tokens, heads, dim] with cos/sin [tokens, 1, dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class LeanConfig:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    max_positions: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "LeanConfig":
        heads = config["num_attention_heads"]
        rope = config.get("rope_parameters") or {}
        return cls(
            hidden=config["hidden_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            max_positions=int(config.get("max_position_embeddings", 2048)),
        )


class LeanLM(nn.Module):
    """Runs a skeleton (see ``build_skeleton``) whose tensors are attached: it takes over its
    modules (no copies, except the fused int8 rows) and drops the rest."""

    def __init__(
        self,
        skeleton: nn.Module,
        config: dict[str, Any],
        activation_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.cfg = LeanConfig.from_dict(config)
        self.config = config
        self.dtype = activation_dtype
        base = skeleton.model
        self.embed = base.embed_tokens.weight
        for layer in base.layers:  # norms in the activation dtype once, not per call
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight = nn.Parameter(norm.weight.data.to(activation_dtype), requires_grad=False)
        self.blocks = nn.ModuleList()
        for i in range(len(base.layers)):
            self.blocks.append(Block(base.layers[i], self.cfg))
            # int8/16-bit rows were read in place (fused_destinations); int4 codes and biases
            # were just concatenated: drop this layer's originals at once, so those copies
            # never add up to more than one layer over the weights
            base.layers[i] = nn.Module()
            release_freed_memory()
        self.norm = base.norm.weight.data.to(activation_dtype)
        self.lm_head = skeleton.lm_head
        self._half_head()
        self.native_off = native_unavailable(self)  # None, or why decode steps use torch ops
        for block in self.blocks:  # int4 codes: kept for edgepack._native, or into torch's kernel order
            for module in block.modules():  # (also those a bias keeps out of a fused kernel)
                if isinstance(module, Int4Linear):
                    module.prepare_native() if self.native_off is None else module.prepare_cpu()
            block.bind()
            release_freed_memory()
        self._inv_freq = 1.0 / (
            self.cfg.rope_theta ** (torch.arange(0, self.cfg.head_dim, 2).float() / self.cfg.head_dim)
        )
        self._cos = self._sin = torch.empty(0)
        self._native: Any = None
        self._native_keep: list[torch.Tensor] = []  # tensors the C step reads that only it holds (float32 biases)

    def _half_head(self) -> None:
        """A bfloat16 head (and the embedding table sharing its storage) converted to
        HEAD_DTYPE in place, HALF_CHUNK weights at a time through a small float32 scratch
        buffer (bfloat16 -> float32 -> float16 are vectorized copies; the direct conversion
        is slower): no second copy of the table, not even for a moment (the loading peak),
        ~15 ms for SmolLM2's 49152 x 576. Exact for normal float16 values; a table holding
        values float16 cannot (|w| >= 65504) stays bfloat16."""
        head = self.lm_head
        if type(head) is not CastLinear or head.weight.dtype != torch.bfloat16 or head.weight.device.type != "cpu":
            return
        weight = head.weight.data
        if not weight.is_contiguous():
            return
        low, high = torch.aminmax(weight)  # a reduction: no temporary the table's size
        if max(-float(low), float(high)) >= FLOAT16_MAX:
            return
        tied = self.embed.data_ptr() == weight.data_ptr() and self.embed.shape == weight.shape
        half = torch.empty(0, dtype=HEAD_DTYPE).set_(weight.untyped_storage(), weight.storage_offset(), weight.shape)
        rows = max(1, HALF_CHUNK // weight.shape[1])
        scratch = torch.empty(rows, weight.shape[1])
        for r in range(0, weight.shape[0], rows):
            part = weight[r : r + rows]
            half[r : r + rows] = scratch[: part.shape[0]].copy_(part)  # read before it is overwritten
        head.weight = nn.Parameter(half, requires_grad=False)
        if tied:
            self.embed = head.weight

    def new_cache(self, max_tokens: int) -> KVCache:
        max_tokens = min(max_tokens, self.cfg.max_positions)
        return KVCache(len(self.blocks), self.cfg.kv_heads, self.cfg.head_dim, max_tokens, KV_DTYPE)

    def _rope(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < start + n:  # grow the tables in powers of two, once per size
            size = 1 << max(8, math.ceil(math.log2(start + n)))
            freqs = torch.outer(torch.arange(size, dtype=torch.float32), self._inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        return self._cos[start : start + n, None], self._sin[start : start + n, None]

    def _hidden(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        n = input_ids.shape[-1]
        start = cache.length if cache is not None else 0
        if cache is not None and start + n > cache.max_tokens:
            raise ValueError(f"the KV cache holds {cache.max_tokens} tokens; {start + n} were asked for")
        cos, sin = self._rope(start, n)
        # a chunk after a prefix needs an explicit causal mask; a lone prompt uses is_causal
        mask = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start) if start > 0 and n > 1 else None
        x = self._embed(input_ids.reshape(n))
        for i, block in enumerate(self.blocks):
            x = block.forward(x, cos, sin, cache, i, start, mask)  # no module-call overhead per layer
        if cache is not None:
            cache.length = start + n
        return x

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed).to(self.dtype)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (self.cfg.hidden,), self.norm, self.cfg.eps)
        return self.lm_head(x.to(self.lm_head.weight.dtype))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> Output:
        return Output(logits=self._head(self._hidden(input_ids, cache))[None])

    @torch.inference_mode()
    def logits_last(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of the last position only: the lm_head runs on one row, not the prompt.
        One token (a decode step) runs in the C step where it can (float32 logits)."""
        if input_ids.numel() == 1 and self.native_off is None:
            return self.native_step(int(input_ids.reshape(-1)[0]), cache)
        return self._head(self._hidden(input_ids, cache)[-1:])[0]

    def native_step(self, token: int, cache: KVCache) -> torch.Tensor:
        """One decode step in edgepack._native: the token's key and value written into
        ``cache`` at its length, float32 logits returned."""
        start = cache.length
        if start + 1 > cache.max_tokens:
            raise ValueError(f"the KV cache holds {cache.max_tokens} tokens; {start + 1} were asked for")
        if self._native is None:
            self._native = _native.new(*native_description(self, self._native_keep))
        cos, sin = self._rope(start, 1)
        logits = torch.empty(self.config["vocab_size"], dtype=torch.float32)
        _native.step(
            self._native, token, start, cache.k.data_ptr(), cache.v.data_ptr(), cache.max_tokens,
            cos.data_ptr(), sin.data_ptr(), logits.data_ptr(), min(torch.get_num_threads(), CPUS),
        )
        cache.length = start + 1
        return logits


def argmax(logits: torch.Tensor) -> int:
    """``int(torch.argmax(logits))``; for float32 CPU logits on the calling thread in C
    (torch's reduction wakes its thread pool every token, which then competes with the
    decode step's threads)."""
    if _native is not None and logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.is_contiguous():
        return _native.argmax(logits.data_ptr(), logits.numel())
    return int(torch.argmax(logits))


NATIVE_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def native_unavailable(model: "LeanLM") -> str | None:
    """None when ``model``'s decode steps can run in edgepack._native, else why not."""
    reason = c_module_unavailable()
    if reason is not None:
        return reason
    if model.dtype != torch.float32 or KV_DTYPE != torch.bfloat16:
        return "activations other than float32"
    tensors = [model.embed, model.norm] + [b.input_norm for b in model.blocks] + [b.post_norm for b in model.blocks]
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors) or model.embed.dtype not in NATIVE_DTYPES:
        return "tensors off the CPU or not contiguous"
    for block in model.blocks:
        for module in (block.qkv_proj, block.o_proj, block.gate_up_proj, block.down_proj):
            if _native_kind(module) is None:
                kind = module.parts[0] if isinstance(module, _Concat) else module
                return f"a {type(kind).__name__} layer (int8, int4 and 16-bit layers only)"
    if _native_kind(model.lm_head) is None:
        return f"a {type(model.lm_head).__name__} head"
    return None


def _native_kind(module: nn.Module) -> str | None:
    if isinstance(module, Int4Linear):
        return "INT4" if module.bias is None and module.native_ready() else None
    if isinstance(module, Int8Linear):
        weight = module.weight
        kind = "INT8"
    elif isinstance(module, nn.Linear) and module.weight.dtype in NATIVE_DTYPES:
        weight = module.weight
        kind = NATIVE_DTYPES[weight.dtype]
    else:
        return None
    return kind if weight.device.type == "cpu" and weight.is_contiguous() else None


def _native_matrix(module: nn.Module, keep: list[torch.Tensor]) -> tuple:
    """(type, rows, cols, weight, scale, bias[, group]) for _native.new; float32 biases made
    here are appended to ``keep`` (the C side holds only their addresses)."""
    kind = _native_kind(module)
    if kind == "INT4":  # LeanLM put it in this layout at load (prepare_native)
        codes, pairs, group = module.native_matrix()
        return (_native.INT4, codes.shape[0], codes.shape[1] * 2, codes.data_ptr(), pairs.data_ptr(), None, group)
    weight = module.weight
    scale = module.scales32 if kind == "INT8" else None  # float32, one per row (the prompt path's too)
    bias = None
    if module.bias is not None:
        bias = module.bias.detach().float().contiguous()
        keep.append(bias)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    return (getattr(_native, kind), weight.shape[0], weight.shape[1], weight.data_ptr(), ptr(scale), ptr(bias))


def native_description(model: "LeanLM", keep: list[torch.Tensor]) -> tuple:
    """The arguments of _native.new for ``model`` (see native_unavailable first)."""
    cfg = model.cfg
    inter = model.blocks[0].inter
    layers = [
        (
            b.input_norm.data_ptr(),
            b.post_norm.data_ptr(),
            _native_matrix(b.qkv_proj, keep),
            _native_matrix(b.o_proj, keep),
            _native_matrix(b.gate_up_proj, keep),
            _native_matrix(b.down_proj, keep),
        )
        for b in model.blocks
    ]
    dims = (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, inter, model.config["vocab_size"])
    embed = (getattr(_native, NATIVE_DTYPES[model.embed.dtype]), model.embed.data_ptr())
    return dims, cfg.eps, embed, model.norm.data_ptr(), _native_matrix(model.lm_head, keep), layers


# --- a transformers-free skeleton with transformers' tensor names ----------------------------


class _Holder(nn.Module):
    """A module that only holds a weight (norms, the embedding table)."""

    def __init__(self, *shape: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape, dtype=dtype, device="meta"), requires_grad=False)


def _linear(name: str, in_f: int, out_f: int, bias: bool, quant: dict, dtype: torch.dtype) -> nn.Module:
    if name in quant["quantized"]:
        if quant["bits"] == 8:
            return Int8Linear(in_f, out_f, bias, dtype)
        if quant["quant_type"] == "int4":
            return Int4Linear(in_f, out_f, bias, dtype, quant["blocksize"])
        return Linear4bit(in_f, out_f, bias, dtype, quant["blocksize"])
    return CastLinear(in_f, out_f, bias=bias, device="meta", dtype=dtype)


class CastLinear(nn.Linear):
    """A 16-bit linear layer that takes activations of any dtype."""

    def reset_parameters(self) -> None:
        pass  # weights come from the bundle; random init on meta would import torch._refs (~1.5 s, ~90 MiB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] >= WIDE_ROWS and x.device.type == "cpu" and self.weight.dtype != torch.float32:
            y = wide_matmul(x.to(self.weight.dtype), self.weight)  # a prompt: float32 GEMM is faster
            return y if self.bias is None else y + self.bias
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def build_skeleton(config: dict[str, Any], quantization: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """Modules on the meta device under the names transformers uses (model.layers.N.self_attn.
    q_proj, ...), so the runtime attaches the same tensors without importing transformers."""
    cfg = LeanConfig.from_dict(config)
    quant = {
        "quantized": set(quantization.get("quantized_modules", [])),
        "bits": quantization["bits"],
        "blocksize": quantization.get("blocksize", 64),
        "quant_type": quantization.get("quant_type"),
    }
    qkv_bias = bool(config.get("attention_bias", config.get("model_type") == "qwen2"))
    o_bias = bool(config.get("attention_bias", False))
    inter, hidden = config["intermediate_size"], cfg.hidden

    def layer(i: int) -> nn.Module:
        p = f"model.layers.{i}"
        attn, mlp, block = nn.Module(), nn.Module(), nn.Module()
        attn.q_proj = _linear(f"{p}.self_attn.q_proj", hidden, cfg.heads * cfg.head_dim, qkv_bias, quant, dtype)
        attn.k_proj = _linear(f"{p}.self_attn.k_proj", hidden, cfg.kv_heads * cfg.head_dim, qkv_bias, quant, dtype)
        attn.v_proj = _linear(f"{p}.self_attn.v_proj", hidden, cfg.kv_heads * cfg.head_dim, qkv_bias, quant, dtype)
        attn.o_proj = _linear(f"{p}.self_attn.o_proj", cfg.heads * cfg.head_dim, hidden, o_bias, quant, dtype)
        mlp.gate_proj = _linear(f"{p}.mlp.gate_proj", hidden, inter, False, quant, dtype)
        mlp.up_proj = _linear(f"{p}.mlp.up_proj", hidden, inter, False, quant, dtype)
        mlp.down_proj = _linear(f"{p}.mlp.down_proj", inter, hidden, False, quant, dtype)
        block.self_attn, block.mlp = attn, mlp
        block.input_layernorm, block.post_attention_layernorm = _Holder(hidden, dtype=dtype), _Holder(hidden, dtype=dtype)
        return block

    root, base = nn.Module(), nn.Module()
    base.embed_tokens = _Holder(config["vocab_size"], hidden, dtype=dtype)
    base.layers = nn.ModuleList(layer(i) for i in range(config["num_hidden_layers"]))
    base.norm = _Holder(hidden, dtype=dtype)
    root.model = base
    root.lm_head = _linear("lm_head", hidden, config["vocab_size"], False, quant, dtype)
    return root
