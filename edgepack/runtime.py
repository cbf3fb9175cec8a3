"""The minimal runtime: load a bundle, verify it, generate.

    import edgepack
    lm = edgepack.load("smollm2-8bit")
    print(lm.generate([{"role": "user", "content": "What is the capital of France?"}]))
    for piece in lm.stream("Once upon a time", max_new_tokens=32):
        print(piece, end="", flush=True)

Loading follows the gpt-fast recipe: the model is built on the meta device (no weights
allocated), quantized layers are swapped in, and the stored tensors are read from the
safetensors shards straight into their final buffers (plain reads, not mmap: see
read_shard), so no full-precision copy of a quantized layer ever exists on the box. This module imports nothing from the exporter, planner or Hub code.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from edgepack import bundle as bundle_format
from edgepack.errors import BundleIntegrityError, DeviceError, GenerationError, InsufficientMemoryError
from edgepack.qlinear import Int4Linear, Int8Linear, Linear4bit

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Activations of the lean CPU decoder (norms, rotary, attention, residual stream).
LEAN_ACTIVATION_DTYPE = torch.float32
# What the process needs beyond the weights before generating: interpreter + torch +
# transformers (~350 MiB measured on x86-64 CPU), KV cache and activations of a short run.
RUNTIME_OVERHEAD_BYTES = 400 * 1024 * 1024


# --- loading -------------------------------------------------------------------------------


def load(
    bundle_dir: str | os.PathLike,
    *,
    verify: bool | str = "once",
    device: str | None = None,
    force: bool = False,
) -> "EdgeModel":
    """Load a bundle written by ``edgepack pack``.

    verify: ``"once"`` (default) hashes every file on the first load and then trusts files
    whose size/mtime/inode are unchanged; ``True`` always hashes; ``False`` checks sizes
    only (the environment variable ``EDGEPACK_SKIP_HASH=1`` does the same).
    device: ``None`` follows the bundle's device_map; ``"cpu"`` forces everything onto the
    CPU. force: load even when this box looks too small.
    """
    # No garbage collection while loading: it makes thousands of small objects (modules,
    # tensors) and each full collection walks everything imported so far (torch's ~150k
    # objects): ~50 ms of a 0.3 s load, for nothing to collect.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load(bundle_dir, verify, device, force)
    finally:
        if enabled:
            gc.enable()


def _load(bundle_dir, verify, device, force) -> "EdgeModel":
    if os.environ.get("EDGEPACK_SKIP_HASH", "") not in ("", "0"):
        verify = False
    path = Path(bundle_dir)
    manifest = bundle_format.verify_bundle(path, check_hashes=verify)
    device_map, notices = _resolve_device_map(manifest, device)
    if not force:
        _preflight_memory(manifest, device_map, path)
    from edgepack.lean import release_freed_memory
    from edgepack.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleIntegrityError(
            f"cannot load the bundle's tokenizer: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            hint="the bundle's tokenizer files are damaged or were edited; pack the model again",
        ) from None
    # Tokenizer first: parsing tokenizer.json peaks ~25 MiB above what it keeps; released
    # now, that peak never stacks on top of the weights.
    release_freed_memory()
    model = _build_model(path, manifest, device_map)
    return EdgeModel(model, tokenizer, manifest, path, device_map, notices)


def _resolve_device_map(manifest: dict, device: str | None) -> tuple[dict[str, str], list[str]]:
    device_map = {k: str(v) if not isinstance(v, int) else f"cuda:{v}" for k, v in manifest["device_map"].items()}
    if device is not None:
        return {k: device for k in device_map}, []
    wants_cuda = any(v.startswith("cuda") for v in device_map.values())
    if wants_cuda and not torch.cuda.is_available():
        notice = "the bundle was planned for a GPU but this box has none; running everything on the CPU"
        return {k: "cpu" for k in device_map}, [notice]
    return device_map, []


def _preflight_memory(manifest: dict, device_map: dict[str, str], path: Path | None = None) -> None:
    """Refuse, with numbers, rather than be OOM-killed half-way through loading.

    need: the weights this box's RAM holds plus RUNTIME_OVERHEAD_BYTES, the whole process
    (interpreter, torch, transformers, a short run's activations). Part of that is already
    held (this process's RSS), so what must still fit is need - RSS, into what this process
    may still allocate: free RAM, or its cgroup's headroom when that is smaller (a
    container's limit is invisible to psutil; see edgepack.memory).
    """
    from edgepack import memory

    mem, mib = manifest["memory"], 1024 * 1024
    on_cpu = all(v == "cpu" for v in device_map.values())
    weights = mem["weight_bytes"] if on_cpu else mem["weight_bytes_per_device"].get("cpu", 0)
    need = weights + RUNTIME_OVERHEAD_BYTES
    held = memory.process_rss_bytes()
    budget = memory.budget()
    if need - held > budget.available_bytes and path is not None:
        # A cgroup is charged for the page cache that verifying the bundle left; drop it, look again.
        memory.evict_page_cache(path / e["path"] for e in manifest["files"])
        budget = memory.budget()
    if need - held > budget.available_bytes:
        where = "of free RAM" if budget.source == "RAM" else (
            f"under its memory cgroup limit of {budget.cgroup.limit_bytes // mib} MiB")  # fmt: skip
        raise InsufficientMemoryError(
            f"the bundle needs about {need // mib} MiB ({weights // mib} MiB of weights + "
            f"{RUNTIME_OVERHEAD_BYTES // mib} MiB for the runtime); this process holds {held // mib} MiB "
            f"and can get only {budget.available_bytes // mib} MiB more {where}",
            hint="free memory or raise the memory limit, pack the model at fewer bits (--bits 4), "
            "or pass --force to try anyway",
        )


def _read_config(path: Path) -> dict:
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleIntegrityError(
            f"cannot read the bundle's config.json ({type(exc).__name__})",
            hint="the bundle's config.json is damaged; pack the model again",
        ) from None
    if not isinstance(config, dict):
        raise BundleIntegrityError("config.json is not a JSON object", hint="pack the model again")
    return config


def _lean_eligible(config: dict, device_map: dict[str, str]) -> bool:
    from edgepack import lean

    if os.environ.get("EDGEPACK_LEAN", "1") == "0" or any(v != "cpu" for v in device_map.values()):
        return False
    return lean.supports(config) is None


def _build_lean(path: Path, manifest: dict, config: dict) -> nn.Module:
    """Llama-family models on CPU: edgepack's lean decoder, no transformers import."""
    from edgepack import lean

    quant = manifest["quantization"]
    try:
        skeleton = lean.build_skeleton(config, quant, DTYPES[quant["compute_dtype"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleIntegrityError(
            f"cannot build the model that config.json describes: {type(exc).__name__}: {exc}",
            hint="the bundle's config.json is damaged or does not match its manifest; pack the model again",
        ) from None
    _attach_tensors(skeleton, path, manifest, into=lean.fused_destinations(skeleton))
    if config.get("tie_word_embeddings") and skeleton.lm_head.weight.device.type == "meta":
        skeleton.lm_head.weight = skeleton.model.embed_tokens.weight
    _check_nothing_left_on_meta(skeleton)
    return lean.LeanLM(skeleton, config, activation_dtype=LEAN_ACTIVATION_DTYPE).eval()


def _check_nothing_left_on_meta(model: nn.Module) -> None:
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    leftover += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if leftover:
        raise BundleIntegrityError(
            f"{len(leftover)} model tensors are not in the bundle (first: {leftover[0]!r}); "
            "config.json disagrees with the weights",
            hint="the bundle is damaged or its config was edited; pack the model again",
        )


def _build_model(path: Path, manifest: dict, device_map: dict[str, str]) -> nn.Module:
    config = _read_config(path)
    if _lean_eligible(config, device_map):
        return _build_lean(path, manifest, config)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    quant = manifest["quantization"]
    compute_dtype = DTYPES[quant["compute_dtype"]]
    try:
        config = AutoConfig.from_pretrained(str(path))
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the runtime places its own quantized layers
        # Parameters on meta, buffers (rotary tables) real: they are computed, never stored.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
        _swap_quantized_layers(model, quant, compute_dtype)
    except BundleIntegrityError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        # config.json passed its hash, so this is a crafted or mismatched bundle
        raise BundleIntegrityError(
            f"cannot build the model that config.json describes: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            hint="the bundle's config.json is damaged or does not match its manifest; pack the model again",
        ) from None
    _attach_tensors(model, path, manifest)
    model.tie_weights()
    _check_nothing_left_on_meta(model)
    model.eval()
    if any(v != "cpu" for v in device_map.values()):
        _place_on_devices(model, manifest, device_map)
    else:
        prepare_int4(model)
    return model


def prepare_int4(model: nn.Module) -> None:
    """Repack int4 codes into the CPU kernel's order now, not on the first token."""
    from edgepack.lean import release_freed_memory

    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    for module in layers:
        module.prepare_cpu()
    if layers:
        release_freed_memory()  # the stored codes, freed between the repacked ones


def _swap_quantized_layers(model: nn.Module, quant: dict, compute_dtype: torch.dtype) -> None:
    bits = quant["bits"]
    for name in quant.get("quantized_modules", []):
        old = model.get_submodule(name)
        in_f, out_f = _linear_shape(old)
        has_bias = getattr(old, "bias", None) is not None
        if bits == 8:
            new = Int8Linear(in_f, out_f, has_bias, compute_dtype)
        elif quant.get("quant_type") == "int4":
            new = Int4Linear(in_f, out_f, has_bias, compute_dtype, quant["blocksize"])
        else:
            new = Linear4bit(in_f, out_f, has_bias, compute_dtype, quant["blocksize"])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear or GPT-2's Conv1D (weight stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.nf
    raise BundleIntegrityError(f"module {type(module).__name__} cannot hold quantized weights")


def _attach_tensors(model: nn.Module, path: Path, manifest: dict, into: dict[str, torch.Tensor] | None = None) -> None:
    """Attach every stored tensor to its module, checking it against the skeleton's shape.
    ``into``: buffers to read some tensors into (see ``read_shard``)."""
    quantized = set(manifest["quantization"].get("quantized_modules", []))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for rel in sorted({info["file"] for info in manifest["tensors"].values()}):
        for key, tensor in read_shard(path / rel, manifest, rel, into=into):
            owner = _quantized_owner(key, quantized)
            if owner is not None:
                groups.setdefault(owner, {})[key[len(owner) + 1 :]] = tensor
            else:
                _set_plain_tensor(model, key, tensor)
    for name, tensors in groups.items():
        _attach_quantized(model.get_submodule(name), name, tensors)


def _attach_quantized(module: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """A quantized layer's stored tensors fit the (meta) buffers its config implies."""
    expected = {k: tuple(t.shape) for k, t in [*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)]}
    for key, shape in expected.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise BundleIntegrityError(
                f"tensor {name + '.' + key!r} is {list(tensors[key].shape)} but config.json implies {list(shape)}",
                hint="the bundle's config and weights disagree; pack the model again",
            )
    try:
        module.attach(tensors)
    except (KeyError, StopIteration, ValueError, RuntimeError) as exc:
        raise BundleIntegrityError(
            f"the stored tensors of quantized layer {name!r} are incomplete or malformed ({type(exc).__name__}: {exc})",
            hint="the bundle is damaged or was crafted; pull or pack it again",
        ) from None


TORCH_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def read_shard(
    path: Path,
    manifest: dict | None = None,
    rel: str | None = None,
    only: set[str] | None = None,
    into: dict[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Read a safetensors shard tensor by tensor into fresh torch buffers.

    Not mmap: a shard truncated while mapped kills the process with SIGBUS, and
    safetensors' views of a mapping sit at any 8-byte offset, which crashes torch's
    int8 CPU kernels (they expect 64-byte aligned weights). One read per tensor straight
    into torch's aligned allocation costs no extra copy. Header and data come from one
    open file, whose size (and header, given the manifest) are checked again: the file
    may have been replaced or truncated since it was verified. ``only``: read just these.
    ``into``: contiguous tensors to read some keys into (when dtype and shape match the
    header), instead of new buffers.
    """
    rel = rel or path.name
    sizes = {e["path"]: e["size"] for e in manifest["files"]} if manifest else {}
    with bundle_format.open_regular(path) as f:
        header, data_start = bundle_format.read_shard_header(f, rel, sizes.get(rel))
        if manifest:
            bundle_format.check_shard_header(rel, header, manifest)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if only is not None and key not in only:
                continue
            start, end = info["data_offsets"]
            dtype = TORCH_DTYPES[info["dtype"]]
            tensor = into.get(key) if into else None
            if tensor is None or tensor.dtype != dtype or list(tensor.shape) != info["shape"]:
                tensor = torch.empty(info["shape"], dtype=dtype)
            if end > start:
                view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                bundle_format.read_exact_into(f, data_start + start, view, rel)
            yield key, tensor


def _quantized_owner(key: str, quantized: set[str]) -> str | None:
    module = key
    while "." in module:
        module = module.rsplit(".", 1)[0]
        if module in quantized:
            return module
    return None


def _set_plain_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        current = getattr(module, attr)
    except AttributeError:
        raise BundleIntegrityError(
            f"tensor {key!r} has no place in the model built from config.json",
            hint="the bundle's config and weights disagree; pack the model again",
        ) from None
    if current is not None and tuple(current.shape) != tuple(tensor.shape):
        raise BundleIntegrityError(
            f"tensor {key!r} is {list(tensor.shape)} but config.json implies {list(current.shape)}",
            hint="the bundle's config and weights disagree; pack the model again",
        )
    if isinstance(current, nn.Parameter) or attr not in module._buffers:
        setattr(module, attr, nn.Parameter(tensor.to(current.dtype), requires_grad=False))
    else:
        module._buffers[attr] = tensor


def _place_on_devices(model: nn.Module, manifest: dict, device_map: dict[str, str]) -> None:
    """CUDA placement: quantized layers become bitsandbytes' own CUDA modules, the rest
    moves as it is. Written against bitsandbytes' public API; exercised only on a GPU box."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise DeviceError(
            "the bundle's device_map uses a GPU, which needs bitsandbytes' CUDA kernels",
            hint="pip install bitsandbytes, or run on the CPU with --device cpu",
        ) from None
    for prefix, device in sorted(device_map.items(), key=lambda kv: len(kv[0])):
        module = model.get_submodule(prefix) if prefix else model
        for name, child in list(module.named_modules()):
            full = f"{prefix}.{name}".strip(".")
            if isinstance(child, (Int8Linear, Linear4bit)):  # int4 layers move as they are
                parent_name, _, leaf = full.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, leaf, _to_bnb_cuda(bnb, child, manifest["quantization"], device))
        module.to(device)
    first = next(iter(device_map.values()))
    model._edgepack_input_device = torch.device(first)
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for prefix, device in device_map.items():
        add_hook_to_module(model.get_submodule(prefix) if prefix else model, AlignDevicesHook(torch.device(device), io_same_device=True))


def _to_bnb_cuda(bnb: Any, layer: nn.Module, quant: dict, device: str) -> nn.Module:
    has_bias = layer.bias is not None
    if isinstance(layer, Int8Linear):
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, has_bias, has_fp16_weights=False)
        weight = bnb.nn.Int8Params(layer.weight, requires_grad=False, has_fp16_weights=False)
        weight.CB, weight.SCB = layer.weight, layer.SCB
        new.weight = weight
    else:
        new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, has_bias, compute_dtype=layer.compute_dtype)
        stats = {k: v for k, v in layer._stored.items() if k.startswith("weight.")}
        new.weight = bnb.nn.Params4bit.from_prequantized(data=layer.weight, quantized_stats=stats, device=device)
    if has_bias:
        new.bias = nn.Parameter(layer.bias.data, requires_grad=False)
    return new.to(device)


# --- generation ----------------------------------------------------------------------------


@dataclass
class GenerationStep:
    """One generated token: its text piece (may be "" while a character is incomplete)."""

    text: str
    token: int
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str | None  # None while generating, then "stop" or "length"
    prompt_seconds: float
    decode_seconds: float


class EdgeModel:
    """A loaded bundle: ``.model`` (torch module, ``model(input_ids).logits``), ``.tokenizer``,
    ``.generate()`` and ``.stream()``."""

    def __init__(self, model, tokenizer, manifest, path, device_map, notices):
        self.model = model
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.path = path
        self.device_map = device_map
        self.notices = notices
        self.input_device = getattr(model, "_edgepack_input_device", torch.device("cpu"))
        self.generation_config = _read_generation_config(path)
        eos = self.generation_config.get("eos_token_id")
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.max_positions = int(manifest["architecture"].get("max_position_embeddings") or 1 << 20)

    @property
    def name(self) -> str:
        return self.path.name

    # prompts ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[dict], chat: bool | None = None) -> list[int]:
        """Token ids for a plain string, or for chat messages through the chat template."""
        if isinstance(prompt, str) and not chat:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not getattr(self.tokenizer, "chat_template", None):
            raise GenerationError(
                "this bundle's tokenizer has no chat template",
                hint="send a plain prompt without --chat",
            )
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # generation ------------------------------------------------------------------------

    def stream_steps(
        self,
        prompt: str | Sequence[dict],
        *,
        max_new_tokens: int = 256,
        min_new_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        chat: bool | None = None,
    ) -> Iterator[GenerationStep]:
        """Generate token by token, yielding a GenerationStep per token."""
        temperature, top_p, top_k = self._sampling_defaults(temperature, top_p, top_k)
        _check_sampling(max_new_tokens, min_new_tokens, temperature, top_p, top_k)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        prompt_ids = self.encode_prompt(prompt, chat)
        if not prompt_ids:
            raise GenerationError("the prompt is empty", hint="give a non-empty prompt")
        if len(prompt_ids) >= self.max_positions:
            raise GenerationError(
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {self.max_positions}",
                hint="shorten the prompt",
            )
        max_new_tokens = min(max_new_tokens, self.max_positions - len(prompt_ids))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        detok = _IncrementalDetokenizer(self.tokenizer)
        t0 = time.perf_counter()
        prompt_seconds = 0.0
        held = ""  # text that may be the start of a stop string: not emitted yet
        tokens = self._tokens(prompt_ids, temperature, top_p, top_k, generator, min_new_tokens, max_new_tokens)
        for n, token in enumerate(tokens, 1):
            if n == 1:
                prompt_seconds = time.perf_counter() - t0
            if token in self.eos_token_ids:
                piece, finish = "", "stop"
            else:
                piece, finish = detok.add(token), ("length" if n >= max_new_tokens else None)
            if finish is not None:
                piece += detok.flush()  # bytes held back for an incomplete character
            if stops:
                held += piece
                hit = _first_stop(held, stops)
                if hit is not None:
                    piece, held, finish = held[:hit], "", "stop"
                elif finish is not None:
                    piece, held = held, ""
                else:
                    keep = _partial_stop_length(held, stops)
                    piece, held = held[: len(held) - keep], held[len(held) - keep :]
            elapsed = time.perf_counter() - t0 - prompt_seconds
            yield GenerationStep(piece, token, len(prompt_ids), n, finish, prompt_seconds, elapsed)
            if finish is not None:
                return

    def stream(self, prompt: str | Sequence[dict], **sampling) -> Iterator[str]:
        """Yield one text piece per generated token."""
        for step in self.stream_steps(prompt, **sampling):
            yield step.text

    def generate(self, prompt: str | Sequence[dict], **sampling) -> str:
        return "".join(self.stream(prompt, **sampling))

    def _sampling_defaults(self, temperature, top_p, top_k):
        gen = self.generation_config
        sample = bool(gen.get("do_sample", False))
        if temperature is None:
            temperature = float(gen.get("temperature") or 1.0) if sample else 0.0
        if top_p is None:
            top_p = float(gen.get("top_p") or 1.0) if sample else 1.0
        if top_k is None:
            top_k = int(gen.get("top_k") or 0) if sample else 0
        return temperature, top_p, top_k

    @torch.inference_mode()
    def _tokens(self, prompt_ids, temperature, top_p, top_k, generator, min_new_tokens, max_new_tokens):
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.input_device)
        step = self._lean_step(len(prompt_ids) + max_new_tokens) if hasattr(self.model, "logits_last") else self._hf_step()
        n = 0
        while True:
            logits = step(input_ids).float()
            if n < min_new_tokens:
                for eos in self.eos_token_ids:
                    logits[eos] = float("-inf")
            token = _sample(logits, temperature, top_p, top_k, generator)
            n += 1
            yield token
            input_ids = torch.tensor([[token]], dtype=torch.long, device=self.input_device)

    def _lean_step(self, max_tokens: int):
        cache = self.model.new_cache(max_tokens)
        return lambda input_ids: self.model.logits_last(input_ids, cache)

    def _hf_step(self):
        state = {"past": None}

        def step(input_ids):
            out = self.model(input_ids=input_ids, past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[0, -1]

        return step


def _read_generation_config(path: Path) -> dict:
    import json

    try:
        data = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_sampling(max_new_tokens, min_new_tokens, temperature, top_p, top_k) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    if not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
        raise GenerationError(f"min_new_tokens must be between 0 and max_new_tokens, not {min_new_tokens!r}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 is greedy), not {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], not {top_p}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 disables it), not {top_k}")


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> int:
    if temperature == 0:
        from edgepack.lean import argmax

        return argmax(logits)
    logits = logits.cpu() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (held back)."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-size:]):
                best = size
                break
    return best


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class _IncrementalDetokenizer:
    """Decode token by token without splitting multi-byte characters or losing the spaces
    a tokenizer only renders in context: decode a short window that overlaps what was
    already emitted and return the difference (the approach of HF text-generation-inference)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete UTF-8 sequence: wait for more
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return text[len(prefix) :]

    def flush(self) -> str:
        """What is still held back at the end of generation, as the tokenizer renders it."""
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        self.prefix_offset = self.read_offset = len(self.tokens)
        return text[len(prefix) :]
