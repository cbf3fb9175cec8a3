"""Bundles loaded as torch modules: the lean decoder (Llama family, lean.py) or a
transformers model, on the CPU or placed on GPUs; and their token loop.

The runtime (runtime.py) comes here only when edgepack's own CPU engine (native.py) cannot run
a bundle, or when asked to (``edgepack.load(..., backend="torch")``).

Loading follows the gpt-fast recipe: the model is built on the meta device (no weights
allocated), quantized layers are swapped in, and the stored tensors are read from the
safetensors shards straight into their final buffers (plain reads, not mmap: see
read_shard), so no full-precision copy of a quantized layer ever exists on the box.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from edgepack.format import bundle as bundle_format
from edgepack.errors import BundleIntegrityError, DeviceError
from edgepack.runtime.torch.linear import Int4Linear, Int8Linear, Linear4bit

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Activations of the lean CPU decoder (norms, rotary, attention, residual stream).
LEAN_ACTIVATION_DTYPE = torch.float32


def _lean_eligible(config: dict, device_map: dict[str, str]) -> bool:
    from edgepack.runtime.torch import llama as lean

    if os.environ.get("EDGEPACK_LEAN", "1") == "0" or any(v != "cpu" for v in device_map.values()):
        return False
    return lean.supports(config) is None


def _build_lean(path: Path, manifest: dict, config: dict) -> nn.Module:
    """Llama-family models on CPU: edgepack's lean decoder, no transformers import."""
    from edgepack.runtime.torch import llama as lean

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


def build_model(path: Path, manifest: dict, config: dict, device_map: dict[str, str]) -> nn.Module:
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
    from edgepack.runtime.memory import release_freed_memory

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
    tables = set(table_modules(manifest))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    held: dict[str, torch.Tensor] = {}  # an 8-bit table's codes or absmax until its other half comes
    for rel in sorted({info["file"] for info in manifest["tensors"].values()}):
        for key, tensor in read_shard(path / rel, manifest, rel, into=into):
            owner = _quantized_owner(key, quantized)
            if owner is not None:
                groups.setdefault(owner, {})[key[len(owner) + 1 :]] = tensor
            elif _table_owner(key) in tables:
                module = _table_owner(key)
                held[key] = tensor
                scales = next((module + s for s in TABLE_SCALES if module + s in held), None)
                if module + ".weight" in held and scales is not None:
                    _set_plain_tensor(model, module + ".weight", dequantized_tables(held, [module])[module + ".weight"])
                    del held[module + ".weight"], held[scales]
            else:
                _set_plain_tensor(model, key, tensor)
    if held:
        raise BundleIntegrityError(
            f"8-bit table tensor {sorted(held)[0]!r} has no codes / scales beside it",
            hint="the bundle is damaged or was crafted; pull or pack it again",
        )
    for name, tensors in groups.items():
        _attach_quantized(model.get_submodule(name), name, tensors)


def table_modules(manifest: dict) -> list[str]:
    """The modules the bundle stores as 8-bit tables (quantization.tables; none in bundles
    packed before it existed)."""
    return list((manifest["quantization"].get("tables") or {}).get("modules", []))


TABLE_SCALES = (".SCB", ".weight.scales")  # int8-rowwise's, int8-block32's (FORMAT.md)


def _table_owner(key: str) -> str:
    """The module an 8-bit table's tensor belongs to (``M.weight``, ``M.SCB``, ``M.weight.scales``)."""
    return key[: -len(".weight.scales")] if key.endswith(".weight.scales") else key.rpartition(".")[0]


def dequantized_tables(tensors: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """``tensors`` with each 8-bit table of ``modules`` replaced by its float32 value:
    ``M.weight`` int8 [rows, cols] with either ``M.SCB`` float32 [rows] (weight * SCB / 127)
    or ``M.weight.scales`` float16 [rows, cols / 32] (weight * the scale of its block of 32)."""
    out = dict(tensors)
    hint = "the bundle is damaged or was crafted; pull or pack it again"
    for module in modules:
        codes, absmax, scales = (out.get(module + s) for s in (".weight",) + TABLE_SCALES)
        if codes is None or (absmax is None) == (scales is None):
            raise BundleIntegrityError(f"8-bit table {module!r} lacks its weight or has not exactly one of "
                                       "SCB and weight.scales", hint=hint)
        if absmax is not None:
            if codes.dtype != torch.int8 or absmax.dtype != torch.float32 or codes.dim() != 2 or list(absmax.shape) != [codes.shape[0]]:
                raise BundleIntegrityError(
                    f"8-bit table {module!r} is {codes.dtype} {list(codes.shape)} with SCB {absmax.dtype} {list(absmax.shape)}; "
                    "int8 [rows, cols] with float32 [rows] was expected", hint=hint)
            del out[module + ".SCB"]
            out[module + ".weight"] = codes.float() * (absmax[:, None] / 127.0)
            continue
        if (codes.dtype != torch.int8 or scales.dtype != torch.float16 or codes.dim() != 2 or codes.shape[1] % 32
                or list(scales.shape) != [codes.shape[0], codes.shape[1] // 32]):
            raise BundleIntegrityError(
                f"8-bit table {module!r} is {codes.dtype} {list(codes.shape)} with scales {scales.dtype} "
                f"{list(scales.shape)}; int8 [rows, 32 k] with float16 [rows, k] was expected", hint=hint)
        del out[module + ".weight.scales"]
        rows, cols = codes.shape
        value = codes.float().reshape(rows, cols // 32, 32) * scales.float()[:, :, None]
        out[module + ".weight"] = value.reshape(rows, cols)
    return out


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
}


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

# --- generation --------------------------------------------------------------------------------


@torch.inference_mode()
def generate_tokens(model: nn.Module, prompt_ids: list[int], eos_ids: set[int], temperature: float, top_p: float,
                    top_k: int, seed: int | None, min_new_tokens: int, max_new_tokens: int) -> Iterator[int]:
    """Token ids, one per step, until the caller stops asking."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    device = getattr(model, "_edgepack_input_device", torch.device("cpu"))
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    step = _lean_step(model, len(prompt_ids) + max_new_tokens) if hasattr(model, "logits_last") else _hf_step(model)
    n = 0
    while True:
        logits = step(input_ids).float()
        if n < min_new_tokens:
            for eos in eos_ids:
                logits[eos] = float("-inf")
        token = _sample(logits, temperature, top_p, top_k, generator)
        n += 1
        yield token
        input_ids = torch.tensor([[token]], dtype=torch.long, device=device)


def _lean_step(model: nn.Module, max_tokens: int):
    cache = model.new_cache(max_tokens)
    return lambda input_ids: model.logits_last(input_ids, cache)


def _hf_step(model: nn.Module):
    state = {"past": None}

    def step(input_ids):
        out = model(input_ids=input_ids, past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[0, -1]

    return step


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> int:
    if temperature == 0:
        from edgepack.runtime.torch.llama import argmax

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
