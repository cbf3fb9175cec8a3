"""``edgepack pack``: quantize a model once and write a bundle that proves itself.

    from edgepack.export.pack import pack
    manifest = pack("smollm2-135m", "smollm2-8bit", bits=8)

The bundle is written into a temporary directory beside OUT, verified by reloading it
with the edgepack runtime (tensors bit-identical to the ones quantized in memory, logits
on a fixed prompt matching a reference computed from bitsandbytes' own dequantization),
and only then swapped in at OUT (staging.py). An interrupted pack leaves no directory that
verify accepts; the next pack removes what it left. ``--force`` replaces an edgepack bundle
or an empty folder, never anything else.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgepack import extras
from edgepack.format import bundle as bundle_format
from edgepack.format import staging
from edgepack.errors import (
    DiskFullError,
    EdgepackError,
    ExportVerificationError,
    OutputExistsError,
    QuantizationError,
    UnsupportedModelError,
)
from edgepack.export.sources import ResolvedSource, resolve_source
from edgepack.plan.model import engine_runs
from edgepack.plan.sizing import default_table_bits

BITS = (16, 8, 4)
QUANT_TYPES = ("nf4", "fp4", "int4")  # int4: edgepack's CPU format (torch's int4 kernel), not bitsandbytes'
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes nf4/fp4
INT4_GROUP_SIZES = (32, 64, 128, 256)  # torch's int4pack CPU kernel
DEFAULT_BLOCKSIZE = {"nf4": 64, "fp4": 64, "int4": 32}
STORAGE_DTYPES = ("bfloat16", "float16")
DEFAULT_SHARD_BYTES = 512 * 1000**2
# A fixed prompt for the logits check: plain English, long enough to exercise attention.
CHECK_PROMPT = "The capital of France is Paris. Water boils at one hundred degrees, and the quick brown fox"
# Relative L2 error allowed between runtime logits and the bitsandbytes reference: bf16
# rounding over a few dozen layers stays under ~2%; a corrupted absmax gives ~100%.
LOGITS_RTOL = 0.05

_REPLACE_HINT = "choose an empty or new folder with -o (--force replaces only an edgepack bundle)"

Progress = Callable[[str], None]


def pack(
    source: str,
    out: str | os.PathLike,
    *,
    bits: int = 8,
    quant_type: str = "nf4",
    double_quant: bool = False,
    blocksize: int | None = None,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    revision: str | None = None,
    gguf_file: str | None = None,
    force: bool = False,
    device_map: dict[str, Any] | None = None,
    target_profile: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
    progress: Progress | None = None,
    smoothing: bool = True,
    gptq: bool = True,
    table_bits: int | None = None,
) -> dict[str, Any]:
    """Quantize ``source`` and write a verified bundle to ``out``; return its manifest.

    smoothing: at 8 bits, rewrite Llama-family models with activation-aware smoothing
    before quantizing (exact in float; see smoothing.py); False quantizes the source as is.
    gptq: at 8 bits, round Llama-family rows with GPTQ's error compensation on the
    calibration text (gptq.py); False rounds to nearest, as bitsandbytes does.
    table_bits: 8 stores the embedding table and output layer as int8 with a float16 scale
    per block of 32 (FORMAT.md, quantization.tables; edgepack's runtime only), 16 keeps them
    at dtype; None: 8 for 8-bit and int4 bundles of models edgepack's CPU engine runs, 16
    otherwise (sizing.default_table_bits)."""
    extras.require("export", "packing a model")  # before the source is downloaded
    say = progress or (lambda _msg: None)
    blocksize = DEFAULT_BLOCKSIZE.get(quant_type, 64) if blocksize is None else blocksize
    _check_options(bits, quant_type, blocksize, dtype, max_shard_bytes, double_quant)
    if table_bits not in (None, 8, 16):
        raise QuantizationError(f"unsupported table bits {table_bits!r}", hint="use --table-bits 8 or 16")
    out = Path(out)
    _check_output(out, force)
    resolved = resolve_source(source, revision=revision, gguf_file=gguf_file)
    started = time.perf_counter()
    from edgepack.export import quantize, reference

    _return_big_frees_to_the_os()
    say(f"loading {source}")
    src = _open_source(resolved)
    say("streaming the checkpoint tensor by tensor" if src.read else "loaded the full-precision model")
    structure = src.model
    blocks = quantize.module_blocks(structure)
    device_map = dict(device_map) if device_map else {name: "cpu" for name in blocks}
    architecture = quantize.architecture_summary(structure)
    check_ids = src.tokenizer.encode(CHECK_PROMPT)
    say("computing reference logits of the full-precision model")
    source_model = src.source_model()  # built once (streamed sources: a lazy reader) for the logits and smoothing
    source_logits = quantize.logits(source_model, check_ids)
    if table_bits is None:  # 8-bit where the engine will read them: the model's, not another runtime's plan
        engine = engine_runs(structure.config.to_dict()) and (plan or {}).get("runtime", "native") == "native"
        table_bits = default_table_bits(bits, quant_type, engine)
    settings = quantize.Settings(bits, quant_type, double_quant, blocksize, dtype, table_bits)
    text = _calibration_text(src, settings, smoothing or gptq, say)
    smooth = _smoothing_plan(src, source_model, settings, smoothing, text, say)
    calibration = _gptq_calibration(source_model, gptq, text, say)
    source_model = None
    result = quantize.quantize_model(structure, settings, say, read=src.read, smoothing=smooth, calibration=calibration)
    calibration = None
    src.model = structure = None  # the full-precision weights are no longer needed
    reference_logits = quantize.logits(reference.dequantized_model(src.config, result, settings), check_ids)
    tmp = staging.make_temp(out)
    try:
        say(f"writing bundle to {tmp.name}")
        shards = _write_weights(tmp, result.tensors, max_shard_bytes)
        _write_model_files(tmp, src, settings, result)
        manifest = _manifest(resolved, architecture, settings, result, shards, device_map, target_profile, plan, tmp)
        bundle_format.write_json_atomic(tmp / bundle_format.MANIFEST_NAME, manifest)
        digests = quantize.tensor_digests(result.tensors)
        result.tensors.clear()  # the shards are the only copy now: verification reloads them
        say("verifying the written bundle with the edgepack runtime")
        manifest["verification"] = _verify_written(tmp, digests, check_ids, reference_logits, source_logits)
        manifest["verification"]["pack_seconds"] = round(time.perf_counter() - started, 2)
        bundle_format.write_json_atomic(tmp / bundle_format.MANIFEST_NAME, manifest)
        _fsync_tree(tmp)
        staging.publish(tmp, out, hint=_REPLACE_HINT)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(exc):
            raise DiskFullError(
                f"the disk holding {out.parent} is full; nothing was written",
                hint="free space there or pack to another disk with -o",
            ) from None
        raise
    say(f"done: {out} ({manifest['memory']['weight_bytes'] / 1e6:.1f} MB of weights)")
    return manifest


def _calibration_text(src: "_Source", settings, wanted: bool, say: Progress):
    """The calibration sequences smoothing and GPTQ measure on (tokenized once, for both),
    or None where neither applies: only 8-bit Llama-family models (smoothing only pays where
    one scale covers a whole row, measured for per-row int8 and not for 4-bit blocks; GPTQ
    runs those models' decoder layers on its own)."""
    if not wanted or settings.bits != 8:
        return None
    from edgepack.export import smoothing

    reason = smoothing.unsupported(src.config)
    if reason is not None:
        say(f"no smoothing or GPTQ for this model: {reason}")
        return None
    return smoothing.model_calibration(src.config, src.tokenizer)


def _smoothing_plan(src: "_Source", source_model, settings, enabled: bool, text, say: Progress):
    """A smoothing.Plan measured on ``text`` (see _calibration_text), else None."""
    if not enabled or text is None:
        return None
    from edgepack.export import smoothing

    say(f"measuring activations on {smoothing.CALIBRATION_TEXT.name} for smoothing (alpha {smoothing.ALPHA})")
    return smoothing.plan(source_model, src.config, src.tokenizer, settings.torch_dtype, calibration=text)


def _gptq_calibration(source_model, enabled: bool, text, say: Progress):
    """Layer-by-layer input Hessians for GPTQ on ``text`` (see _calibration_text), else None."""
    if not enabled or text is None:
        return None
    from edgepack.export import gptq

    sequences, _digest = text
    say(f"GPTQ rounding on {sum(len(s) for s in sequences)} calibration tokens, a layer at a time")
    return gptq.LayerwiseCalibration(source_model, sequences)


def _return_big_frees_to_the_os() -> None:
    """Packing allocates and frees tensors of tens of MiB (a layer read, quantized,
    dequantized for the reference). glibc's dynamic mmap threshold climbs to 32 MiB, after
    which such blocks come from the heap and stay in RSS when freed, fragmenting it by up
    to ~0.9 GiB on a 1B model (measured). A fixed 1 MiB threshold maps them and unmaps
    them on free."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


# --- options and output directory ---------------------------------------------------------


def _check_options(
    bits: int, quant_type: str, blocksize: int, dtype: str, max_shard_bytes: int, double_quant: bool = False
) -> None:
    if bits not in BITS:
        raise QuantizationError(f"unsupported bits {bits!r}", hint="use --bits 16, 8 or 4")
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(
            f"unsupported 4-bit quant type {quant_type!r}", hint="use --quant-type nf4, fp4 or int4 (CPU)"
        )
    if quant_type == "int4":  # at 16/8 bits the quant type (and its default group) is unused
        if blocksize not in INT4_GROUP_SIZES:
            raise QuantizationError(
                f"unsupported int4 group size {blocksize}", hint=f"use one of {', '.join(map(str, INT4_GROUP_SIZES))}"
            )
        if double_quant:
            raise QuantizationError("--double-quant is a bitsandbytes nf4/fp4 option", hint="drop it for int4")
    elif blocksize not in BLOCKSIZES:
        raise QuantizationError(
            f"unsupported 4-bit block size {blocksize}", hint=f"use one of {', '.join(map(str, BLOCKSIZES))}"
        )
    if dtype not in STORAGE_DTYPES:
        raise QuantizationError(f"unsupported 16-bit dtype {dtype!r}", hint="use bfloat16 or float16")
    if max_shard_bytes < 1_000_000:
        raise QuantizationError(
            f"--max-shard-size {max_shard_bytes} bytes is too small", hint="use at least 1MB, e.g. 512MB"
        )


def parse_size(text: str) -> int:
    """'512MB' -> 512_000_000, '2GiB' -> 2 * 1024**3, '1000' -> 1000 (bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise QuantizationError(f"cannot read size {text!r}", hint="write it like 512MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    if unit not in scale:
        raise QuantizationError(f"cannot read size {text!r}", hint="write it like 512MB or 2GiB")
    return int(number * scale[unit])


def _check_output(out: Path, force: bool) -> None:
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(
            f"output {out} already exists", hint="choose another -o, or pass --force to replace the bundle there"
        )
    staging.check_replaceable(out, hint=_REPLACE_HINT)


def _is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC or EDQUOT, also when a library wrapped it: safetensors raises SafetensorError
    ("... No space left on device (os error 28)"), transformers may re-raise its own."""
    for _ in range(8):  # the chain of causes, bounded
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(exc) for s in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- loading the source ---------------------------------------------------------------------


@dataclass
class _Source:
    """A source model: its config, tokenizer and generation config, and either the loaded
    full-precision model or, for safetensors checkpoints, a meta-device skeleton plus a
    reader that streams each tensor from its shard."""

    config: Any
    tokenizer: Any
    generation_config: Any
    model: Any  # full-precision model, or the skeleton on meta when streaming
    read: Callable | None = None  # key -> tensor, when streaming
    keys: list[str] = field(default_factory=list)

    def source_model(self):
        if self.read is None:
            return self.model
        from edgepack.export import quantize, reference

        linears = {n for n, m in self.model.named_modules() if quantize.is_linear(m) and f"{n}.weight" in self.keys}
        return reference.lazy_source_model(self.config, self.read, linears, self.keys)


def _open_source(resolved: ResolvedSource) -> _Source:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # edgepack reports its own progress
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(str(resolved.path), **kwargs)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModelError(
            f"cannot read the model config from {resolved.path}: {str(exc).splitlines()[0]}",
            hint="is this a Hugging Face transformers model?",
        ) from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise UnsupportedModelError(
            f"{config.model_type!r} models are not causal language models transformers can generate with",
            hint="edgepack packs decoder-only LMs (Llama, GPT-2, Qwen, Mistral, Phi, ...)",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), **kwargs)
        streamed = None if resolved.gguf_file else _streaming_source(resolved.path, config)
        if streamed is not None:
            skeleton, read, keys = streamed
            generation = _generation_config(resolved.path, skeleton)
            return _Source(config, tokenizer, generation, skeleton, read, keys)
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=torch.float32, **kwargs)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModelError(
            f"cannot load {resolved.path}: {str(exc).splitlines()[0]}",
            hint="check that the model's weights and tokenizer files are complete",
        ) from None
    if getattr(model.config, "quantization_config", None) is not None:
        model.hf_quantizer = None  # a GGUF source is plain floats once loaded
        del model.config.quantization_config
    return _Source(model.config, tokenizer, getattr(model, "generation_config", None), model.eval())


def _streaming_source(folder: Path, config):
    """(skeleton, reader, keys) when every tensor the model needs is in the folder's
    safetensors under the model's own names; None otherwise (then the model is loaded whole)."""
    from edgepack.export import reference

    if not any(folder.glob("*.safetensors")):
        return None
    reader = reference.ShardReader(folder)
    from edgepack.export.quantize import unique_tensors

    skeleton = reference.skeleton(config)
    keys = [key for key, _tensor in unique_tensors(skeleton)]
    if not all(k in reader.files for k in keys):
        return None
    return skeleton, reader, keys


def _generation_config(folder: Path, model):
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(folder))
    return getattr(model, "generation_config", None)


# --- writing ----------------------------------------------------------------------------------


def _write_weights(tmp: Path, tensors: dict, max_shard_bytes: int) -> dict[str, list[str]]:
    """Shard tensors in order; one tensor larger than the limit gets a shard of its own."""
    import json

    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        names = {"model.safetensors": shards[0]}
    else:
        total = len(shards)
        names = {f"model-{i:05d}-of-{total:05d}.safetensors": s for i, s in enumerate(shards, 1)}
    for file_name, keys in names.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(tmp / file_name), metadata={"format": "pt"})
    if len(names) > 1:  # transformers finds multi-shard checkpoints through this index
        total_size = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: f for f, keys in names.items() for k in keys}
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_model_files(tmp: Path, src: "_Source", settings, result) -> None:
    from edgepack.export import quantize

    config = src.config
    config.quantization_config = quantize.transformers_quantization_config(settings, result)
    if config.quantization_config is None:
        del config.quantization_config
    config.dtype = settings.dtype
    config.save_pretrained(str(tmp))
    if src.generation_config is not None:
        src.generation_config.save_pretrained(str(tmp))
    src.tokenizer.save_pretrained(str(tmp))


def _manifest(resolved, architecture, settings, result, shards, device_map, target_profile, plan, tmp) -> dict[str, Any]:
    from edgepack.export import quantize

    tensors = {
        name: {"file": file_name, "dtype": quantize.safetensors_dtype(result.tensors[name]),
               "shape": list(result.tensors[name].shape)}
        for file_name, names in shards.items() for name in names
    }
    weight_bytes = sum(t.numel() * t.element_size() for t in result.tensors.values())
    rel_files = [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()]
    rel_files = [r for r in rel_files if r not in (*bundle_format.UNLISTED_FILES, bundle_format.UNFINISHED_NAME)]
    return {
        "format": bundle_format.FORMAT_NAME,
        "format_version": bundle_format.FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": quantize.tool_versions(),
        "source": resolved.info,
        "architecture": architecture,
        "quantization": settings.manifest_section(result),
        "device_map": device_map,
        "target_profile": target_profile,
        "plan": plan,
        "memory": {
            "weight_bytes": weight_bytes,
            "weight_bytes_per_device": quantize.bytes_per_device(result.tensors, device_map),
        },
        "tensors": tensors,
        "files": bundle_format.file_entries(tmp, rel_files),
    }


# --- self-verification --------------------------------------------------------------------


def _verify_written(tmp: Path, digests: dict, check_ids: list[int], reference, source) -> dict[str, Any]:
    """Compare the written tensors bit for bit with the quantized ones (by digest), reload
    the bundle with the runtime and compare logits, or refuse to publish."""
    import torch

    from edgepack import runtime
    from edgepack.export import quantize

    mismatched = quantize.compare_stored_tensors(tmp, digests)
    if mismatched:
        raise ExportVerificationError(
            f"{len(mismatched)} tensors differ after writing and reading back (first: {mismatched[0]})",
            hint="the serializer is broken for this setting; report it with `edgepack --version`",
        )
    try:
        lm = runtime.load(tmp, verify=True, device="cpu", force=True)
    except EdgepackError as exc:
        raise ExportVerificationError(f"the written bundle does not load: {exc.message}") from None
    from edgepack.runtime.engine import float_activations

    with float_activations():  # the manifest's figures describe the bundle, not this CPU's int8 activations
        got = quantize.logits(lm.model, check_ids)
    rel = float(torch.linalg.vector_norm(got - reference) / torch.linalg.vector_norm(reference))
    if not rel <= LOGITS_RTOL:
        raise ExportVerificationError(
            f"logits of the reloaded bundle differ from the in-memory quantized model by {rel:.1%} "
            f"(allowed {LOGITS_RTOL:.0%}) on a fixed prompt",
            hint="the bundle would print garbage; nothing was published. Try another --bits or --quant-type",
        )
    return {
        "tensors_bit_identical": True,
        "tensors_checked": len(digests),
        "prompt_tokens": len(check_ids),
        "logits_rel_error_vs_reference": round(rel, 5),
        **quantize.quality_vs_source(got, source),
    }


# --- CLI ------------------------------------------------------------------------------------


def configure_parser(p) -> None:
    p.add_argument("source", help="Hub repo id, local model directory, .gguf file, or alias (smollm2-135m)")
    p.add_argument("-o", "--out", required=True, help="bundle directory to write")
    p.add_argument("--bits", type=int, default=None, help="16, 8 or 4 (default 8, or the plan's choice with --profile)")
    p.add_argument("--quant-type", default=None,
                   help="4-bit data type: nf4 (default; with --profile: int4 on a CPU-only device) or fp4 (bitsandbytes; GPUs, plain transformers), or int4 "
                        "(edgepack's CPU format: ~12x faster than nf4 on a CPU, edgepack runtime only)")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the block scales too (saves ~0.4 bit/weight)")
    p.add_argument("--blocksize", type=int, default=None,
                   help="4-bit block size: nf4/fp4 default 64 (transformers reads only 64); int4 group 32 (or 64, 128, 256)")
    p.add_argument("--dtype", default=None,
                   help="dtype of what stays 16-bit, and the compute dtype: bfloat16 (default) or float16 "
                        "(the default with a --profile whose GPU has no bfloat16, e.g. gtx1650-4gb, t4)")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside a local folder or Hub repo")
    p.add_argument("--max-shard-size", default="512MB", help="largest weight shard (default 512MB)")
    p.add_argument("--profile", default=None, help="target device profile (name or file): plan bits and device_map for it")
    p.add_argument("--context", type=int, default=None, help="with --profile: context length to plan for")
    p.add_argument("--prefer", choices=("quality", "balanced", "speed"), default=None,
                   help="with --profile: how the plan chooses bits (see `edgepack plan --help`; default balanced)")
    p.add_argument("--no-smoothing", action="store_true",
                   help="8-bit: quantize the weights as they are (default: activation-aware smoothing first on "
                        "Llama-family models; exact in float, lower quantization error)")
    p.add_argument("--no-gptq", action="store_true",
                   help="8-bit: round each weight to nearest, as bitsandbytes does (default: GPTQ's error-compensated "
                        "rounding on Llama-family models; same format, lower error, ~25 s more on the default model)")
    p.add_argument("--table-bits", type=int, choices=(8, 16), default=None,
                   help="the embedding table and output layer: 8 (default for --bits 8 and int4 of models "
                        "edgepack's CPU engine runs: int8 with a float16 scale per block of 32; the output layer is "
                        "read every token; edgepack's runtime only, not plain transformers) or 16 (default otherwise)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")


def check_options(args) -> None:
    """Refuse options that contradict each other instead of ignoring one of them."""
    from edgepack.errors import UsageError

    four_bit_only = [flag for flag, given in (("--quant-type", args.quant_type is not None),
                     ("--double-quant", args.double_quant), ("--blocksize", args.blocksize is not None)) if given]
    if four_bit_only and args.bits is not None and args.bits != 4:
        raise UsageError(f"{four_bit_only[0]} applies to 4-bit packing only, not --bits {args.bits}",
                         hint=f"drop {four_bit_only[0]}, or pass --bits 4")
    if four_bit_only and args.bits is None and args.profile is None:
        raise UsageError(f"{four_bit_only[0]} applies to 4-bit packing, and --bits defaults to 8",
                         hint="add --bits 4")
    if getattr(args, "prefer", None) and not args.profile:
        raise UsageError("--prefer applies to the plan of --profile", hint="add --profile NAME, or drop --prefer")
    if args.bits == 4 and (args.no_smoothing or args.no_gptq):
        flag = "--no-smoothing" if args.no_smoothing else "--no-gptq"
        raise UsageError(f"{flag} applies to 8-bit packing only, not --bits 4", hint=f"drop {flag}")


def main(args) -> int:
    import sys

    check_options(args)
    say = None if args.quiet else (lambda msg: print(f"[edgepack] {msg}", file=sys.stderr, flush=True))
    options: dict[str, Any] = {}
    bits = args.bits
    if args.profile:
        from edgepack.cli import plan as plan_cli

        options = plan_cli.plan_for_pack(args.source, args.profile, args.context, args.bits, args.revision,
                                         args.gguf_file, args.quant_type, say, double_quant=args.double_quant,
                                         prefer=getattr(args, "prefer", None) or "balanced")
        bits = options.pop("bits")
    quant_type = options.pop("quant_type", None) or args.quant_type or "nf4"
    planned_dtype = options.pop("dtype", None)  # float16 for a profile whose GPU has no bfloat16
    dtype = args.dtype or planned_dtype or "bfloat16"
    manifest = pack(
        args.source,
        args.out,
        bits=8 if bits is None else bits,
        quant_type=quant_type,
        double_quant=args.double_quant,
        blocksize=args.blocksize,
        dtype=dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
        revision=args.revision,
        gguf_file=args.gguf_file,
        force=args.force,
        progress=say,
        smoothing=not args.no_smoothing,
        gptq=not args.no_gptq,
        table_bits=args.table_bits,
        **options,
    )
    q, v = manifest["quantization"], manifest["verification"]
    if getattr(args, "json", False):
        import json

        print(json.dumps({"bundle": str(args.out), "bits": q["bits"], "scheme": q["scheme"],
                          "weight_bytes": manifest["memory"]["weight_bytes"], "files": len(manifest["files"]),
                          "top1_agreement_vs_source": v["top1_agreement_vs_source"],
                          "mean_kl_vs_source": v.get("mean_kl_vs_source")}))
        return 0
    print(
        f"packed {args.out}: {q['bits']}-bit {q['scheme']}, {manifest['memory']['weight_bytes'] / 1e6:.1f} MB weights, "
        f"{len(manifest['files'])} files; verified (tensors bit-identical, top-1 agreement with source "
        f"{v['top1_agreement_vs_source']:.0%})"
    )
    return 0
