"""Quantization for the exporter: bitsandbytes' storage layouts, produced once.

8-bit is bitsandbytes' int8 row-wise format (int8 weight + float32 absmax per row, keys
``weight`` / ``SCB``); 4-bit is its packed nf4/fp4 format (``weight`` + ``weight.absmax``,
``weight.quant_map``, nested stats with double quantization, and the packed
``weight.quant_state.bitsandbytes__nf4``). These are the keys transformers itself writes,
so the files stay loadable by plain transformers where it can (see FORMAT.md).

4-bit ``int4`` is edgepack's own CPU format (bitsandbytes has no fast CPU 4-bit matmul):
affine codes in groups along the input, the layout torch's fused int4 CPU kernel runs
(see qlinear.py). transformers cannot load it.

Only the exporter imports this module (it imports bitsandbytes); the runtime reads the
same tensors with plain torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from edgepack.errors import QuantizationError
from edgepack.plan.model import is_linear, out_in, unique_tensors
from edgepack.runtime.torch.linear import int4_fits

# pack.py describes the model through this module's names
from edgepack.plan.model import architecture_summary, module_blocks  # noqa: F401

SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
    torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.bool: "BOOL", torch.float64: "F64",
}
OUTPUT_LAYER_REASON = (
    "output layer (lm_head): kept in 16-bit because its errors go straight into every "
    "token's probabilities; bitsandbytes keeps it too (llama.cpp's k-quants keep it at 6 bits or more)"
)
TIED_REASON = "tied to the input embeddings, which are stored once in 16-bit"
# 8-bit tables: the embedding table and the output layer as int8 codes with a float16
# scale per block of 32 values of a row (llama.cpp's Q8_0 granularity, 8.5 bits a value;
# "int8-block32": M.weight I8 + M.weight.scales F16 [rows, cols / 32]), or, where a row is
# not whole blocks, one float32 absmax per row (bitsandbytes' int8 layout, "int8-rowwise":
# M.weight I8 + M.SCB F32 [rows], W ~= weight * SCB / 127); the manifest's
# quantization.tables lists them. SmolLM2-135M: its 49,152 x 576 tied table is 56 of the
# 163 MB a decode step reads at 16 bits; a scale per row of 576 values costs it 1.6x the
# KL of one per 32 (FORMAT.md).
TABLE_SCHEME = "int8-block32"
TABLE_SCHEME_ROWWISE = "int8-rowwise"
TABLE_BLOCK = 32
INT4_SHAPE_REASON = (
    "int4: torch's CPU kernel needs out_features divisible by 16 and in_features by the "
    "group size; kept in 16-bit"
)


@dataclass(frozen=True)
class Settings:
    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    dtype: str = "bfloat16"  # storage and compute dtype of everything not quantized
    table_bits: int = 16  # the embedding table and output layer: 16 (as dtype) or 8 (TABLE_SCHEME)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def scheme(self) -> str:
        return {16: "none", 8: "int8-rowwise"}.get(self.bits, self.quant_type)

    @property
    def method(self) -> str:
        if self.bits == 16:
            return "none"
        return "edgepack" if self.quant_type == "int4" and self.bits == 4 else "bitsandbytes"

    def manifest_section(self, result: "Result") -> dict[str, Any]:
        section: dict[str, Any] = {
            "bits": self.bits,
            "method": self.method,
            "scheme": self.scheme,
            "compute_dtype": self.dtype,
            "storage_dtype": self.dtype,
            "quantized_modules": result.quantized_modules,
            "kept_modules": result.kept_modules,
        }
        if self.bits == 8:
            section["weight_only"] = True  # the runtime does not quantize activations
        if result.smoothing is not None:
            section["smoothing"] = result.smoothing
        if result.gptq is not None:
            section["rounding"] = result.gptq
        if self.bits == 4:
            section.update(quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant)
        if result.tables:
            section["tables"] = {"bits": 8, "scheme": result.table_scheme, "modules": list(result.tables)}
        return section


@dataclass
class Result:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # what the shards hold, in order
    quantized_modules: list[str] = field(default_factory=list)
    kept_modules: dict[str, str] = field(default_factory=dict)  # module -> why it stayed 16-bit
    smoothing: dict[str, Any] | None = None  # how the float model was rewritten first (smoothing.py)
    gptq: dict[str, Any] | None = None  # how 8-bit rows were rounded, when not to nearest (gptq.py)
    tables: list[str] = field(default_factory=list)  # embedding / output modules stored as 8-bit tables
    table_scheme: str = TABLE_SCHEME  # how they are stored (TABLE_SCHEME or TABLE_SCHEME_ROWWISE)


def quantize_model(
    model: nn.Module,
    settings: Settings,
    say: Callable[[str], None],
    read: Callable[[str], torch.Tensor] | None = None,
    smoothing: Any = None,
    calibration: Any = None,
) -> Result:
    """Quantize every linear layer but the output layer, one tensor at a time.

    ``model`` gives the structure (it may sit on the meta device); ``read(key)`` gives each
    source tensor (default: the model's own), so a checkpoint can be streamed from its
    shards: only one full-precision tensor is alive at a time, plus the quantized output.
    """
    read = read or (lambda key: _get(model, key).detach())
    source_read = read
    result = Result()
    if smoothing is not None:  # a smoothing.Plan: quantize the rewritten model instead
        read = smoothing.wrap(read)
        result.smoothing = smoothing.describe()
    output = model.get_output_embeddings()
    tables = _table_modules(model) if settings.table_bits == 8 else {}
    if tables:
        result.table_scheme = table_scheme([_get(model, f"{name}.weight").shape[1] for name in tables])
    targets = {}
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        if module is output:
            tied = output.weight is model.get_input_embeddings().weight
            if not tables:  # at 8 bits it is a table (quantization.tables), not a kept layer
                result.kept_modules[name] = TIED_REASON if tied else OUTPUT_LAYER_REASON
        elif settings.bits < 16:
            out_f, in_f = out_in(module)
            if settings.method == "edgepack" and not int4_fits(out_f, in_f, settings.blocksize):
                result.kept_modules[name] = INT4_SHAPE_REASON
            else:
                targets[name] = module
    for key, tensor in unique_tensors(model):
        owner, _, attr = key.rpartition(".")
        if owner in targets and attr == "weight":
            conv1d = type(targets[owner]).__name__ == "Conv1D"  # GPT-2 stores [in, out]
            weight = read(key)
            weight = weight.T.contiguous() if conv1d else weight
            hessian = _hessian(owner, calibration, smoothing, source_read)
            for suffix, value in quantize_weight(weight, settings, hessian).items():
                result.tensors[f"{owner}.{suffix}"] = value
            del weight
            result.quantized_modules.append(owner)
            if len(result.quantized_modules) % 20 == 0:
                say(f"quantized {len(result.quantized_modules)}/{len(targets)} layers")
        elif owner in tables and attr == "weight":
            if result.table_scheme == TABLE_SCHEME:
                result.tensors[key], result.tensors[f"{key}.scales"] = quantize_table_blocks(read(key))
            else:
                result.tensors[key], result.tensors[f"{owner}.SCB"] = quantize_table(read(key))
            result.tables.append(owner)
        else:
            result.tensors[key] = _store_plain(read(key), settings)
    if calibration is not None:
        result.gptq = calibration.describe()
    say(f"quantized {len(result.quantized_modules)} layers to {settings.bits}-bit ({settings.scheme})")
    return result


def table_scheme(widths: list[int]) -> str:
    """How 8-bit tables of these row widths are stored: a scale per block of 32 where every
    row is whole blocks (the engine's kernels read no partial block), else one per row."""
    return TABLE_SCHEME if all(w % TABLE_BLOCK == 0 for w in widths) else TABLE_SCHEME_ROWWISE


def _table_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The input embedding and an untied output layer, by module name: the tables
    Settings.table_bits 8 stores as int8 rows (a tied output layer is the embedding's table)."""
    names = {id(m): n for n, m in model.named_modules()}
    tables = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if module is not None and id(module) in names and weight is not None and weight.dim() == 2:
            tables[names[id(module)]] = module
    return tables


def quantize_table(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding table / output layer [rows, cols] as int8 codes and float32 absmax per
    row, rounded to nearest (W ~= codes * absmax / 127; an all-zero row has absmax 0)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    codes = torch.round(w * scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.contiguous(), absmax.contiguous()


def quantize_table_blocks(weight: torch.Tensor, block: int = TABLE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding table / output layer [rows, cols] (cols a multiple of ``block``) as int8
    codes and a float16 scale per block of ``block`` values of a row, rounded to nearest
    against the scale as stored: W ~= codes * scales[:, k // block]. The scale is the
    block's absmax / 127 rounded to float16 (Q8_0's); a block whose absmax is too large for
    float16 x 127 (> 8e6) has no finite scale, and one that rounds below float16's smallest
    subnormal reads as zero."""
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // block, block)
    scales = (w.abs().amax(dim=2) / 127.0).to(torch.float16)
    if not torch.isfinite(scales).all():
        raise QuantizationError(
            "a block of the embedding table or output layer is too large for an 8-bit table's float16 scale",
            hint="pack with --table-bits 16",
        )
    s = scales.float()
    inverse = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.round(w * inverse[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(rows, cols).contiguous(), scales.contiguous()


def _hessian(owner: str, calibration: Any, smoothing: Any, read: Callable[[str], torch.Tensor]) -> torch.Tensor | None:
    """The input Hessian of decoder projection ``owner`` (model.layers.N.<module>) for GPTQ,
    in the smoothed model's coordinates when smoothing rewrote it (its input columns are
    divided by what the weight's are multiplied by); None elsewhere."""
    parts = owner.split(".")
    if calibration is None or len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    layer, module = int(parts[2]), ".".join(parts[3:])
    h = calibration.hessian(layer, module)
    if h is None or smoothing is None:
        return h
    d = smoothing.column_scale(layer, module, read)
    if d is None:
        return h
    d = d.to(h.dtype)
    return (h / d[:, None]).div_(d[None, :])  # one new [in, in] matrix, no outer product


def _get(model: nn.Module, key: str) -> torch.Tensor:
    owner, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _store_plain(tensor: torch.Tensor, settings: Settings) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor.detach().clone()
    return tensor.detach().to(settings.torch_dtype).contiguous()


def bnb_functional():
    """bitsandbytes.functional, without its warning about an optional CPU kernel package
    (`kernels`) that only speeds up 4-bit matmuls we never run here."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional as F

    return F


def quantize_weight(weight: torch.Tensor, settings: Settings, hessian: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """bitsandbytes' storage for one [out, in] weight, keyed by suffix (weight, SCB, weight.absmax...).
    hessian: at 8 bits, the input Hessian for GPTQ's error-compensated rounding (gptq.py)."""
    if settings.bits == 8 and hessian is not None:
        from edgepack.export import gptq

        try:
            cb, scb = gptq.quantize_rows(weight, hessian)
        except (ValueError, torch.linalg.LinAlgError):  # overflowed or singular even damped
            cb, scb = gptq.quantize_rows(weight, None)  # nearest, on the same bf16-exact scales
        return {"weight": cb, "SCB": scb}
    if settings.method == "edgepack":
        return quantize_int4(weight, settings.blocksize, settings.torch_dtype)
    F = bnb_functional()
    if settings.bits == 8:
        cb, scb, _ = F.int8_vectorwise_quant(weight.float())
        return {"weight": cb, "SCB": scb}
    packed, state = F.quantize_4bit(
        weight.to(settings.torch_dtype),
        blocksize=settings.blocksize,
        compress_statistics=settings.double_quant,
        quant_type=settings.quant_type,
    )
    return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def quantize_int4(weight: torch.Tensor, group: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """edgepack's int4 storage for one [out, in] weight: each group of ``group`` inputs spans
    its own [min, max] in 16 steps (like llama.cpp's Q4_1), W = (q - 8) * scale + zero.
    Codes are rounded against the scale and zero as stored (16-bit), so what the kernel
    computes is the nearest point of the grid it actually has."""
    w = weight.detach().to(torch.float32)
    out_f, in_f = w.shape
    groups = w.view(out_f, in_f // group, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    flat = hi <= lo  # a constant group: scale 0, the zero is the value itself
    scale = torch.where(flat, torch.zeros_like(lo), (hi - lo) / 15)
    zero = torch.where(flat, lo, lo + 8 * scale)
    scale, zero = scale.to(dtype), zero.to(dtype)
    s32, z32 = scale.float()[..., None], zero.float()[..., None]
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    codes = torch.where(s32 > 0, torch.round((groups - z32) / safe) + 8, torch.full_like(groups, 8))
    codes = codes.clamp_(0, 15).to(torch.uint8).view(out_f, in_f)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"weight": packed.contiguous(), "weight.scales_and_zeros": torch.stack((scale, zero), -1).transpose(0, 1).contiguous()}


def transformers_quantization_config(settings: Settings, result: Result) -> dict[str, Any] | None:
    """The config.json section that lets plain transformers load the same files."""
    if settings.bits == 16 or settings.method == "edgepack":
        return None  # int4 is edgepack's own format: transformers cannot load it
    from transformers import BitsAndBytesConfig

    skip = list(result.kept_modules)
    if settings.bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.quant_type,
            bnb_4bit_use_double_quant=settings.double_quant,
            bnb_4bit_compute_dtype=settings.torch_dtype,
            llm_int8_skip_modules=skip,
        )
    return config.to_dict()


# --- manifest sections --------------------------------------------------------------------------


def bytes_per_device(tensors: dict[str, torch.Tensor], device_map: dict[str, Any]) -> dict[str, int]:
    totals: dict[str, int] = {}
    prefixes = sorted(device_map, key=len, reverse=True)
    for name, tensor in tensors.items():
        block = next((p for p in prefixes if p == "" or name == p or name.startswith(p + ".")), None)
        device = str(device_map[block]) if block is not None else "cpu"
        totals[device] = totals.get(device, 0) + tensor.numel() * tensor.element_size()
    return totals


def safetensors_dtype(tensor: torch.Tensor) -> str:
    return SAFETENSORS_DTYPES[tensor.dtype]


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for dist in ("edgepack", "torch", "transformers", "bitsandbytes", "safetensors", "accelerate", "huggingface_hub"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


# --- checks ------------------------------------------------------------------------------------


@torch.inference_mode()
def logits(model, ids: list[int]) -> torch.Tensor:
    """Logits at every position of ``ids``: a torch model in one forward; edgepack's CPU
    engine (runtime backend "native") one token a step, as it decodes."""
    if getattr(model, "backend", None) == "native":
        cache = model.new_cache(len(ids))
        return torch.stack([torch.frombuffer(model.forward([t], cache), dtype=torch.float32) for t in ids])
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """(dtype, shape, BLAKE2b of the bytes) of each tensor: what the bit-for-bit check of the
    written shards compares against, so the in-memory tensors can go before the reload."""
    return {name: _fingerprint(t) for name, t in tensors.items()}


def _fingerprint(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], str]:
    import hashlib

    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.blake2b(memoryview(raw.numpy()), digest_size=20).hexdigest()
    return str(tensor.dtype), tuple(tensor.shape), digest


def compare_stored_tensors(bundle_dir, digests: dict[str, tuple[str, tuple[int, ...], str]]) -> list[str]:
    """Names whose bytes, dtype or shape differ between the shards and ``digests`` (see
    ``tensor_digests``). Reads one tensor at a time, with the runtime's own reader."""
    from pathlib import Path

    from edgepack.runtime.torch.model import read_shard  # the reader the runtime itself loads with

    mismatched, found = [], set()
    for shard in sorted(Path(bundle_dir).glob("*.safetensors")):
        for key, stored in read_shard(shard):
            found.add(key)
            if digests.get(key) != _fingerprint(stored):
                mismatched.append(key)
            del stored
    mismatched += sorted(set(digests) - found)
    return mismatched


def quality_vs_source(got: torch.Tensor, source: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(source || bundle) over the check prompt's positions."""
    log_p = torch.log_softmax(source.float(), -1)
    log_q = torch.log_softmax(got.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    agree = (source.argmax(-1) == got.argmax(-1)).float().mean()
    return {"top1_agreement_vs_source": round(float(agree), 4), "mean_kl_vs_source": round(float(kl), 6)}
