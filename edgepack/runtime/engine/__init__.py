"""edgepack's own CPU engine: Llama-family bundles run by the C module edgepack.runtime.engine._engine, without torch.

On a small box most of a cold start was ``import torch`` (~1.05 s, ~220 MiB before a weight
is read). This engine reads the bundle's tensors as stored (int8 + row scales, edgepack's
int4, 16-bit) into one anonymous memory map, joins q/k/v and gate/up rows as it reads them
(they land next to each other: no copy), and hands their addresses to the C module, which
runs prompts (GEMMs over chunks of tokens) and decode steps (one call a token) with a
bfloat16 KV cache and float32 activations, but for a decode step's int8 products on x86: their
input rounded to int8 per block of 32, as llama.cpp's Q8_0 does (~1.4x the decode speed on a
2-core AVX2 box; SmolLM2-135M's perplexity and KL to the source within Q8_0's, table_quality.py).
EDGEPACK_ACTIVATION_BITS=32 (``--activations float``): float32 there too, logits within 1e-4
of float64's. An 8-bit table (``pack --table-bits 8``) is read as stored: the embedding row
times its scale, the output layer as an int8 matrix. Imports: the standard library,
``tokenizers`` (and jinja2 for chat templates).

    lm = NativeLM.load(path, manifest, config)
    cache = lm.new_cache(512)
    logits = lm.forward(prompt_ids, cache)      # float32 memoryview, [vocab]
    token = lm.sample(logits, temperature=0.0)

What it covers is what ``unavailable()`` does not refuse; the rest (nf4/fp4 layers, other
architectures, GPUs, an x86 box without AVX2 unless EDGEPACK_NATIVE=1) loads through torch.
Beyond plain Llama (``supports``), the families of ``family.py`` (Llama 3's rope scaling,
Qwen3, SmolLM3, Gemma 2 / 3, Mistral's sliding window, Phi-3 / Phi-4-mini) run with the
features it derives from config.json.
"""

from __future__ import annotations

import mmap
import os
import random
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from edgepack.format import bundle as bundle_format
from edgepack.errors import BundleIntegrityError
from edgepack.runtime.engine.arena import FLOATS, half_table, read_tensors, weight_map
from edgepack.runtime.engine.cache import NativeCache
from edgepack.runtime.engine.family import GEMMA, LLAMA_LIKE, Features, features
from edgepack.runtime.engine.threads import ACTIVATIONS_ENV, CPUS, THREADS_ENV, asked_threads, threads  # noqa: F401
from edgepack.runtime.engine.threads import asked_activation_bits

try:  # built by setup.py; absent where edgepack was installed without a C compiler
    from edgepack.runtime.engine import _engine as _native
except ImportError:
    _native = None

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# EDGEPACK_NATIVE=0 turns the C code off (torch runs everything). It is on where it has tuned
# kernels: x86-64 with AVX2 or AVX-512, every aarch64 CPU (NEON; sdot where the CPU has it);
# elsewhere off unless EDGEPACK_NATIVE=1 (its portable kernels are untuned: 28 ms a SmolLM2
# step on x86-64 without AVX2, against torch's 18).
NATIVE_ENV = "EDGEPACK_NATIVE"
ALIGN = 64  # every tensor starts on a cache line


def supports(config: dict[str, Any]) -> str | None:
    """None when the plain Llama-family decoders (lean.py, and this engine without any of
    family.py's features) can run the model, else why not."""
    if config.get("model_type") not in SUPPORTED_TYPES:
        return f"model_type {config.get('model_type')!r}"
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        return f"rope type {rope.get('rope_type')!r}"
    sliding = "sliding_attention" in (config.get("layer_types") or [])  # Qwen2 with use_sliding_window
    if sliding or (config.get("model_type") == "mistral" and config.get("sliding_window")):
        return "sliding-window attention"
    if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
        return "MLP variant"
    return None


def c_module_unavailable() -> str | None:
    """None when edgepack.runtime.engine._engine may run here, else why not."""
    if _native is None:
        return "edgepack.runtime.engine._engine is not built (no C compiler at install time)"
    setting = os.environ.get(NATIVE_ENV, "")
    if setting == "0":
        return f"{NATIVE_ENV}=0"
    if _native.set_isa() == "generic" and setting != "1":
        return "no AVX2 or AVX-512 on this CPU (EDGEPACK_NATIVE=1 uses the portable kernels)"
    return None


def unavailable(config: dict[str, Any], manifest: dict[str, Any], device_map: dict[str, str]) -> str | None:
    """None when this engine can run the bundle on this box, else why not."""
    reason = c_module_unavailable()
    if reason is not None:
        return reason
    if any(v != "cpu" for v in device_map.values()):
        return "the device_map places layers on a GPU"
    if config.get("model_type") in ENGINE_TYPES:
        _check_config(config)  # before features() builds per-layer lists and rotary tables
    found = features(config)
    if isinstance(found, str):
        return found
    quant = manifest["quantization"]
    if quant["bits"] == 4 and quant.get("quant_type") != "int4":
        return f"{quant.get('quant_type')} layers (int8, int4 and 16-bit only)"
    return None


# --- where each stored tensor goes -----------------------------------------------------------


@dataclass
class Slot:
    """A stored tensor's place: ``offset`` in the arena, read there as stored; or read into
    scratch and then converted to float32 at ``offset32`` (norms, biases), or, for int4's
    (scale, zero) pairs (``pairs``: stored [groups, rows]), transposed into rows ``pairs_row0``..
    of the [rows, groups] block at ``offset``."""

    shape: tuple[int, ...]
    offset: int | None = None
    offset32: int | None = None
    pairs: bool = False
    pairs_row0: int = 0
    divide: float = 1.0  # int8 row absmax -> scale: SCB / 127, in place


class _Layout:
    """Offsets in one arena, each aligned to ALIGN."""

    def __init__(self) -> None:
        self.size = 0

    def take(self, nbytes: int) -> int:
        at = -(-self.size // ALIGN) * ALIGN
        self.size = at + nbytes
        return at


@dataclass
class Matrix:
    """A (possibly fused) matrix as the C module reads it."""

    kind: str  # INT8, INT8_B32 (an 8-bit table's float16 scale per block of 32), INT4, BF16, F16, F32
    rows: int
    cols: int
    weight: int  # arena offsets
    scale: int | None = None  # INT8 scales / INT4 pairs
    bias: int | None = None
    group: int = 0


def _kind(header: dict, name: str) -> str:
    info = header[name + ".weight"]
    if info["dtype"] == "I8":
        return "INT8_B32" if name + ".weight.scales" in header else "INT8"
    if info["dtype"] == "U8":
        return "INT4"
    if info["dtype"] in FLOATS:
        return info["dtype"]
    raise BundleIntegrityError(f"tensor {name}.weight is {info['dtype']}, which edgepack's CPU engine cannot read")


def _plan_matrix(
    parts: list[str], header: dict, layout: _Layout, slots: dict[str, Slot], cols: int, rows: list[int]
) -> Matrix:
    """Place the parts of one fused matrix (q/k/v, gate/up, or one projection) side by side."""
    kinds = {_kind(header, p) for p in parts}
    if len(kinds) != 1:
        raise BundleIntegrityError(f"{parts[0]} and the layers fused with it are stored in different formats")
    kind = kinds.pop()
    total = sum(rows)
    width = cols // 2 if kind == "INT4" else cols
    esize = bundle_format.DTYPE_BYTES[header[parts[0] + ".weight"]["dtype"]]
    matrix = Matrix(kind, total, cols, layout.take(total * width * esize))
    at = matrix.weight
    for p, r in zip(parts, rows):
        _expect(header, p + ".weight", [r, width])
        slots[p + ".weight"] = Slot((r, width), offset=at)
        at += r * width * esize
    if kind == "INT8_B32":  # an untied output layer stored as an 8-bit table (quantization.tables)
        if cols % 32:
            raise BundleIntegrityError(f"{parts[0]}: an 8-bit table's rows must be whole blocks of 32")
        matrix.scale = at = layout.take(total * cols // 32 * 2)
        for p, r in zip(parts, rows):
            _expect(header, p + ".weight.scales", [r, cols // 32], "F16")
            slots[p + ".weight.scales"] = Slot((r, cols // 32), offset=at)
            at += r * cols // 32 * 2
    elif kind == "INT8":
        matrix.scale = at = layout.take(total * 4)
        for p, r in zip(parts, rows):
            _expect(header, p + ".SCB", [r], "F32")
            slots[p + ".SCB"] = Slot((r,), offset=at, divide=127.0)
            at += r * 4
    elif kind == "INT4":
        first = header.get(parts[0] + ".weight.scales_and_zeros")
        groups = first["shape"][0] if first else 0
        if not groups or cols % groups or (cols // groups) % 32:
            raise BundleIntegrityError(f"{parts[0]}: int4 (scale, zero) pairs missing or not in groups of 32k inputs")
        matrix.group = cols // groups
        matrix.scale = layout.take(total * groups * 4)
        row0 = 0
        for p, r in zip(parts, rows):
            _expect(header, p + ".weight.scales_and_zeros", [groups, r, 2], "BF16")
            slots[p + ".weight.scales_and_zeros"] = Slot((groups, r, 2), offset=matrix.scale, pairs=True, pairs_row0=row0)
            row0 += r
    biases = [p + ".bias" for p in parts if p + ".bias" in header]
    if biases:
        if len(biases) != len(parts):
            raise BundleIntegrityError(f"{parts[0]}: some of the layers fused with it have biases and some do not")
        matrix.bias = at = layout.take(total * 4)
        for p, r in zip(parts, rows):
            _expect(header, p + ".bias", [r])
            slots[p + ".bias"] = Slot((r,), offset32=at)
            at += r * 4
    return matrix


def _expect(header: dict, name: str, shape: list[int], dtype: str | None = None) -> None:
    info = header.get(name)
    if info is None:
        raise BundleIntegrityError(
            f"tensor {name!r} is not in the bundle; config.json disagrees with the weights",
            hint="the bundle is damaged or its config was edited; pack the model again",
        )
    if list(info["shape"]) != shape or (dtype is not None and info["dtype"] != dtype):
        raise BundleIntegrityError(
            f"tensor {name!r} is {info['dtype']} {info['shape']} but config.json implies {dtype or info['dtype']} {shape}",
            hint="the bundle's config and weights disagree; pack the model again",
        )


@dataclass
class _Plan:
    layout: _Layout
    slots: dict[str, Slot]
    embed: int
    embed_dtype: str
    norm: int
    head: Matrix
    # (in_norm, post_norm, qkv, o, gate_up, down, q_norm, k_norm, attn_out_norm, mlp_out_norm):
    # the C module's layer, its last four None where the family has none
    layers: list[tuple]
    features: Features
    norms: list[tuple[int, int]]  # (offset32, size) of every norm vector (Gemma adds 1 to each)
    embed_rows: int | None = None  # an 8-bit table's scales (quantization.tables): per row, or per block (embed_kind)
    embed_kind: str = ""  # the C module's type of the embedding table (INT8, INT8_B32, F16, ...)


ENGINE_TYPES = LLAMA_LIKE + GEMMA
MAX_HEAD_DIM = 4096  # 16x the widest heads in use (Gemma's 256): the rotary tables stay small
MAX_LAYERS = 4096  # 32x the deepest models in use: per-layer lists stay small


def _check_config(config: dict[str, Any]) -> None:
    """The numbers the C module trusts: positive integers and positive finite floats."""
    ints = ["hidden_size", "num_attention_heads", "intermediate_size", "vocab_size", "num_hidden_layers",
            "max_position_embeddings", "num_key_value_heads", "head_dim"]
    for key in ints:
        value = config.get(key, 1 if key in ("max_position_embeddings", "num_key_value_heads", "head_dim") else None)
        if value is None and key in ("num_key_value_heads", "head_dim"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 31:
            raise BundleIntegrityError(
                f"config.json's {key} is {value!r}; a positive integer was expected",
                hint="the bundle's config.json is damaged; pack the model again",
            )
    if config["num_hidden_layers"] > MAX_LAYERS:
        raise BundleIntegrityError(
            f"config.json says {config['num_hidden_layers']} layers; no model has more than {MAX_LAYERS}",
            hint="the bundle's config.json is damaged; pack the model again",
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim > MAX_HEAD_DIM:
        raise BundleIntegrityError(
            f"config.json's attention heads are {head_dim} wide; no model's exceed {MAX_HEAD_DIM}",
            hint="the bundle's config.json is damaged; pack the model again",
        )
    for key in ("rms_norm_eps", "rope_theta"):
        value = config.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise BundleIntegrityError(
                f"config.json's {key} is {value!r}; a positive number was expected",
                hint="the bundle's config.json is damaged; pack the model again",
            )


def _plan(config: dict[str, Any], header: dict[str, dict], feats: Features) -> _Plan:
    _check_config(config)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    dim = config.get("head_dim") or hidden // heads
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    layout, slots, norms = _Layout(), {}, []

    def vector(name: str, size: int) -> int:
        _expect(header, name, [size])
        at = layout.take(size * 4)
        slots[name] = Slot((size,), offset32=at)
        norms.append((at, size))
        return at

    embed_name = "model.embed_tokens.weight"
    _expect(header, embed_name, [vocab, hidden])
    embed_dtype = header[embed_name]["dtype"]
    if embed_dtype not in FLOATS and embed_dtype != "I8":
        raise BundleIntegrityError(f"the embedding table is {embed_dtype}; edgepack's CPU engine reads 8/16/32-bit tables")
    embed = layout.take(vocab * hidden * bundle_format.DTYPE_BYTES[embed_dtype])
    slots[embed_name] = Slot((vocab, hidden), offset=embed)
    embed_rows, embed_kind = None, embed_dtype
    if embed_dtype == "I8" and "model.embed_tokens.weight.scales" in header:  # 8-bit table, a scale per 32
        if hidden % 32:
            raise BundleIntegrityError("the 8-bit embedding table's rows must be whole blocks of 32")
        _expect(header, "model.embed_tokens.weight.scales", [vocab, hidden // 32], "F16")
        embed_rows, embed_kind = layout.take(vocab * hidden // 32 * 2), "INT8_B32"
        slots["model.embed_tokens.weight.scales"] = Slot((vocab, hidden // 32), offset=embed_rows)
    elif embed_dtype == "I8":  # an 8-bit table: int8 rows, their absmax -> scale in place
        _expect(header, "model.embed_tokens.SCB", [vocab], "F32")
        embed_rows, embed_kind = layout.take(vocab * 4), "INT8"
        slots["model.embed_tokens.SCB"] = Slot((vocab,), offset=embed_rows, divide=127.0)
    layers = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        a, m = p + ".self_attn", p + ".mlp"
        # Phi-3 stores q/k/v and gate/up fused, rows in the engine's own order: one part each
        if a + ".qkv_proj.weight" in header:
            qkv = _plan_matrix([a + ".qkv_proj"], header, layout, slots, hidden, [(heads + 2 * kv_heads) * dim])
        else:
            qkv = _plan_matrix([a + ".q_proj", a + ".k_proj", a + ".v_proj"], header, layout, slots, hidden,
                               [heads * dim, kv_heads * dim, kv_heads * dim])
        o = _plan_matrix([a + ".o_proj"], header, layout, slots, heads * dim, [hidden])
        if m + ".gate_up_proj.weight" in header:
            gate_up = _plan_matrix([m + ".gate_up_proj"], header, layout, slots, hidden, [2 * inter])
        else:
            gate_up = _plan_matrix([m + ".gate_proj", m + ".up_proj"], header, layout, slots, hidden, [inter, inter])
        down = _plan_matrix([m + ".down_proj"], header, layout, slots, inter, [hidden])
        q_norm = k_norm = attn_out = mlp_out = None
        if feats.qk_norm:
            q_norm, k_norm = vector(a + ".q_norm.weight", dim), vector(a + ".k_norm.weight", dim)
        if feats.sandwich:  # Gemma: post_attention_layernorm normalizes the attention's output
            attn_out = vector(p + ".post_attention_layernorm.weight", hidden)
            mlp_out = vector(p + ".post_feedforward_layernorm.weight", hidden)
            pre_mlp = vector(p + ".pre_feedforward_layernorm.weight", hidden)
        else:
            pre_mlp = vector(p + ".post_attention_layernorm.weight", hidden)
        layers.append((vector(p + ".input_layernorm.weight", hidden), pre_mlp, qkv, o, gate_up, down,
                       q_norm, k_norm, attn_out, mlp_out))
    norm = vector("model.norm.weight", hidden)
    if "lm_head.weight" in header:
        head = _plan_matrix(["lm_head"], header, layout, slots, hidden, [vocab])
    elif config.get("tie_word_embeddings", True):
        head = Matrix(embed_kind, vocab, hidden, embed, scale=embed_rows)
    else:
        raise BundleIntegrityError("the bundle has no lm_head.weight and config.json does not tie it to the embeddings")
    extra = sorted(set(header) - set(slots))
    if extra:
        raise BundleIntegrityError(
            f"tensor {extra[0]!r} has no place in the model built from config.json",
            hint="the bundle's config and weights disagree; pack the model again",
        )
    return _Plan(layout, slots, embed, embed_dtype, norm, head, layers, feats, norms, embed_rows, embed_kind)


# --- the engine -------------------------------------------------------------------------------


class NativeLM:
    """A bundle loaded for edgepack.runtime.engine._engine (see the module docstring)."""

    backend = "native"

    def __init__(self, config: dict[str, Any], arena: mmap.mmap, plan: _Plan):
        self.config = config
        self.arena = arena  # owns every weight the C model points into
        self.vocab = config["vocab_size"]
        self.layers = config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.heads
        self.max_positions = int(config.get("max_position_embeddings", 2048))
        rope = config.get("rope_parameters") or {}
        self.rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        self._threads = threads()
        self.adapt = asked_threads() is None  # pick the count per step, up to self.threads
        if asked_activation_bits() is not None:  # the C module's, process-wide: the last load's asking wins
            _native.activation_bits(asked_activation_bits())
        self._int8 = any(m.kind in ("INT8", "INT4") for m in [plan.head, *(x for layer in plan.layers for x in layer[2:6])])
        base = _native.address(arena)

        def mat(m: Matrix) -> tuple:
            opt = lambda at: None if at is None else base + at  # noqa: E731
            extra = (m.group,) if m.kind == "INT4" else ()
            return (getattr(_native, m.kind), m.rows, m.cols, base + m.weight, opt(m.scale), opt(m.bias)) + extra

        dims = (config["hidden_size"], self.heads, self.kv_heads, self.head_dim, config["intermediate_size"], self.vocab)
        feats, opt = plan.features, lambda at: None if at is None else base + at  # noqa: E731
        self._features = feats
        self.sliding, self.window = sum(feats.layer_sliding), feats.window
        # longrope: a forward call whose last position reaches this rotates all its tokens with
        # the long factors, so a prompt past it gives other keys in pieces than whole (0: never)
        self.long_rope_from = feats.long_from
        layers, extra = [], ()
        for i, (a, b, q, o, g, d, qn, kn, an, mn) in enumerate(plan.layers):
            layer = (base + a, base + b, mat(q), mat(o), mat(g), mat(d))
            if not feats.plain:
                layer += (opt(qn), opt(kn), opt(an), opt(mn), feats.layer_rope[i], int(feats.layer_sliding[i]))
            layers.append(layer)
        if not feats.plain:  # new() copies the rotary tables out of `freqs`
            *numbers, freqs = feats.c_tuple(self.head_dim)
            extra = (tuple(numbers) + (_native.address(freqs) if freqs else None,),)
        if plan.embed_rows is None:
            embed = (getattr(_native, plan.embed_dtype), base + plan.embed)
        else:
            embed = (getattr(_native, plan.embed_kind), base + plan.embed, base + plan.embed_rows)
        self._model = _native.new(
            dims, float(config.get("rms_norm_eps", 1e-6)), embed,
            base + plan.norm, mat(plan.head), layers, *extra,
        )
        self.weight_bytes = plan.layout.size

    @property
    def threads(self) -> int:
        return self._threads

    @threads.setter
    def threads(self, n: int) -> None:  # a count set by hand is used as it is
        self._threads, self.adapt = max(1, int(n)), False

    def threads_in_use(self) -> int:
        """The threads decode steps run on now (adaptive: the count last measured fastest)."""
        return (_native.threads_in_use() or self._threads) if self.adapt else self._threads

    def activations(self) -> str:
        """'int8' where this model's decode steps round int8 products' inputs to int8 now, else 'float'."""
        return "int8" if self._int8 and _native.int8_activations() else "float"

    @classmethod
    def load(cls, path: Path, manifest: dict[str, Any], config: dict[str, Any]) -> "NativeLM":
        """Read every tensor of the bundle at ``path`` into place (see _plan). Each shard is
        opened once: its header and its data come from the same open file, whose size and
        header are checked again (it may have been replaced or truncated since verifying)."""
        asked_activation_bits()  # a bad EDGEPACK_ACTIVATION_BITS refused before any read
        sizes = {e["path"]: e["size"] for e in manifest["files"]}
        with ExitStack() as stack:
            shards, header = {}, {}
            for rel in sorted({info["file"] for info in manifest["tensors"].values()}):
                f = stack.enter_context(bundle_format.open_regular(path / rel))
                part, data_start = bundle_format.read_shard_header(f, rel, sizes.get(rel))
                bundle_format.check_shard_header(rel, part, manifest)
                shards[rel] = (f, data_start)
                header.update({k: dict(v, file=rel) for k, v in part.items()})
            try:
                found = features(config)
                if isinstance(found, str):
                    raise BundleIntegrityError(f"edgepack's CPU engine cannot run this model: {found}")
                plan = _plan(config, header, found)
            except BundleIntegrityError:
                raise
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleIntegrityError(
                    f"cannot build the model that config.json describes: {type(exc).__name__}: {exc}",
                    hint="the bundle's config.json is damaged or does not match its manifest; pack the model again",
                ) from None
            arena = weight_map(plan.layout.size)
            read_tensors(shards, header, plan, arena)
        half_table(plan, arena)
        if plan.features.norm_offset:  # Gemma's norms scale by (1 + w): the 1 added once here
            for at, size in plan.norms:
                with memoryview(arena)[at : at + 4 * size] as raw, raw.cast("f") as floats:
                    for i in range(size):
                        floats[i] += plan.features.norm_offset
        try:
            return cls(config, arena, plan)
        except (KeyError, TypeError, ValueError) as exc:  # dimensions or codes the C module refuses
            if str(exc).startswith("int8 weight code -128"):  # module.c, codes_in_range
                raise BundleIntegrityError(
                    "the bundle holds an int8 weight code of -128, which edgepack's packer never writes",
                    hint="the bundle was made by another tool or altered after packing; pack the model again",
                ) from None
            raise BundleIntegrityError(
                f"cannot build the model that config.json describes: {type(exc).__name__}: {exc}",
                hint="the bundle's config.json is damaged or does not match its manifest; pack the model again",
            ) from None

    def new_cache(self, max_tokens: int) -> NativeCache:
        max_tokens = min(max_tokens, self.max_positions)
        return NativeCache(self.layers, self.kv_heads, self.head_dim, max_tokens, self.sliding, self.window)

    def forward(self, tokens: Sequence[int], cache: NativeCache) -> memoryview:
        """Run ``tokens`` after what ``cache`` holds; float32 logits of the last one."""
        n = len(tokens)
        if cache.length + n > cache.max_tokens:
            raise ValueError(f"the KV cache holds {cache.max_tokens} tokens; {cache.length + n} were asked for")
        logits = bytearray(4 * self.vocab)
        _native.forward(self._model, tokens, cache.length, cache.k, cache.v, cache.max_tokens, self.rope_theta,
                        _native.address(logits), self._threads, self.adapt)
        cache.length += n
        return memoryview(logits).cast("f")

    def step_batch(self, tokens: Sequence[int], caches: Sequence[NativeCache]) -> list[memoryview]:
        """One decode step of each sequence: ``tokens[i]`` after what ``caches[i]`` holds
        (distinct caches). Each weight row is read from memory once for all of them, and
        each sequence's logits are bitwise those ``forward([token], cache)`` gives."""
        if len(tokens) != len(caches) or len({id(c) for c in caches}) != len(caches):
            raise ValueError("step_batch needs one distinct cache per token")
        for cache in caches:
            if cache.length + 1 > cache.max_tokens:
                raise ValueError(f"the KV cache holds {cache.max_tokens} tokens; {cache.length + 1} were asked for")
        if not self._features.plain:
            # batch.c runs the plain Llama layer only; family features (ring caches, QK-norm,
            # soft-caps, ...) step one sequence at a time: the same logits, weights read B times
            return [self.forward([int(t)], c) for t, c in zip(tokens, caches)]
        out = bytearray(4 * self.vocab * len(tokens))
        base = _native.address(out) if tokens else 0
        steps = [(int(t), c.length, c.k, c.v, c.max_tokens, base + 4 * self.vocab * i)
                 for i, (t, c) in enumerate(zip(tokens, caches))]
        _native.step_batch(self._model, steps, self.rope_theta, self._threads, self.adapt)
        for cache in caches:
            cache.length += 1
        view = memoryview(out).cast("f")
        return [view[i * self.vocab : (i + 1) * self.vocab] for i in range(len(tokens))]

    def sample(self, logits: memoryview, temperature: float, top_p: float = 1.0, top_k: int = 0,
               rng: random.Random | None = None) -> int:
        """Greedy (temperature 0), or sampled with temperature, top-k and top-p, as the torch path does."""
        if temperature == 0:
            return _native.argmax(_native.address(logits), len(logits))
        u = (rng or random).random()
        return _native.sample(_native.address(logits), len(logits), float(temperature), int(top_k), float(top_p), u)

    def generate_tokens(self, prompt_ids: list[int], eos_ids: set[int], temperature: float, top_p: float, top_k: int,
                        seed: int | None, min_new_tokens: int, max_new_tokens: int) -> Iterator[int]:
        rng = random.Random(seed) if seed is not None else None
        cache = self.new_cache(len(prompt_ids) + max_new_tokens)
        ids, n = list(prompt_ids), 0
        while True:
            logits = self.forward(ids, cache)
            if n < min_new_tokens:
                for eos in eos_ids:
                    logits[eos] = float("-inf")
            token = self.sample(logits, temperature, top_p, top_k, rng)
            n += 1
            yield token
            ids = [token]


@contextmanager
def float_activations() -> Iterator[None]:
    """Decode steps with float32 activations inside (logits within 1e-4 of float64's, on any CPU)."""
    previous = _native.activation_bits(32) if _native is not None else None
    try:
        yield
    finally:
        if previous is not None:
            _native.activation_bits(previous)
