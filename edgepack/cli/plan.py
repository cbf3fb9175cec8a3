"""``edgepack plan``: pick bits and a device_map for a target device, from the config alone.

    edgepack plan smollm2-135m --profile rpi4-4gb
    edgepack plan ./my-model --profile mybox.json --context 4096 --json

No weights are read or downloaded: the model is described from its config (config.json, a
GGUF file's header, or a Hub repo's config.json) by edgepack.plan.model, from its numbers
for the Llama family, else built on the meta device; the decision itself is
edgepack.plan.planner's, which is pure. ``plan_for_pack`` is what
``edgepack pack --profile`` calls.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from edgepack.format.refs import is_local_path
from edgepack.plan import planner
from edgepack.plan import source as source_precision
from edgepack.plan.model import ModelDescription, describe_model
from edgepack.plan.source import KL_8BIT, KL_BUDGET, KL_INT4_SAME_GRID, SourcePrecision
from edgepack.plan.sizing import GIB, MIB
from edgepack.errors import EdgepackError, SourceNotFoundError, UnsupportedModelError, printable


# --- the model's sizes, from its config -------------------------------------------------------


def load_config(source: str, revision: str | None = None, gguf_file: str | None = None):
    """The config of SOURCE (local dir, .gguf, alias or Hub id), weights untouched: config.json's
    dict (a GGUF file's numbers for a Llama-family one) where edgepack.plan.model can describe
    it without torch, else a transformers config."""
    return load_source(source, revision, gguf_file)[0]


def load_source(source: str, revision: str | None = None, gguf_file: str | None = None):
    """(config as load_config returns it, the source's own precision: a GGUF's tensor types
    from its header, or config.json's quantization_config / dtype)."""
    from edgepack.export import sources

    local = source in sources.ALIASES or source.endswith(".gguf") or is_local_path(source)
    try:
        if local and (found := _local_gguf(source, gguf_file)):
            folder, gguf = found
        elif local:
            resolved = sources.resolve_source(source, revision=revision, gguf_file=gguf_file)
            folder, gguf = str(resolved.path), resolved.gguf_file
        else:
            folder, gguf = _hub_config(source, revision, gguf_file), None
        precision = _precision(Path(folder), gguf, gguf_file)
        quick = _config_dict(Path(folder), gguf)
        if quick is not None:
            return quick, precision
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {})), precision
    except EdgepackError:
        raise
    except (ValueError, KeyError, RecursionError) as exc:  # RecursionError: a config nested too deeply
        raise UnsupportedModelError(
            f"cannot read the model config of {source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            hint="is this a Hugging Face transformers model?",
        ) from None


def _local_gguf(source: str, gguf_file: str | None) -> tuple[str, str] | None:
    """(folder, file name) of a local GGUF source, found without what resolve_source adds for
    packing (the file's SHA-256: seconds for a large file; the gguf package); None for any
    other source, or one that is missing, for resolve_source to report."""
    import importlib.util

    from edgepack.export import sources

    if source in sources.ALIASES:
        entry = sources.ALIASES[source]
        spec = importlib.util.find_spec(entry["package"])  # finds the folder without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        folder, name = Path(list(spec.submodule_search_locations)[0]), entry["gguf_file"]
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf":
            folder, name = path.parent, path.name
        elif gguf_file and path.is_dir():
            folder, name = path, gguf_file
        else:
            return None
    return (str(folder), name) if (folder / name).is_file() else None


def _precision(folder: Path, gguf: str | None, asked_gguf: str | None) -> SourcePrecision:
    """The source's own precision; a Hub GGUF repo's file is not downloaded, so its name says."""
    if gguf:
        return source_precision.from_gguf(folder / gguf)
    if asked_gguf:
        return source_precision.from_gguf_name(asked_gguf)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return source_precision.UNKNOWN
    return source_precision.from_config(config) if isinstance(config, dict) else source_precision.UNKNOWN


def _config_dict(folder: Path, gguf_file: str | None) -> dict[str, Any] | None:
    """config.json (or a Llama GGUF header) as a dict when describe_model needs no torch for
    it; None sends the caller to transformers, which also reports what is wrong with a file."""
    import struct

    from edgepack.plan import gguf
    from edgepack.plan.model import config_only

    try:
        if gguf_file:
            config = gguf.llama_config(folder / gguf_file)
        else:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return config if isinstance(config, dict) and config_only(config) else None


def _hub_config(repo_id: str, revision: str | None, gguf_file: str | None) -> str:
    """The folder holding just config.json from the Hub (a GGUF repo needs one too)."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    from edgepack.errors import HubError

    try:
        return str(Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent)
    except hub_errors.EntryNotFoundError:
        raise SourceNotFoundError(
            f"{repo_id} has no config.json" + (f" beside {gguf_file}" if gguf_file else ""),
            hint="planning reads only the config, never weights: pass the base model's repo id, "
            "or download the GGUF file and plan from its local path",
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise SourceNotFoundError(f"model not found: {repo_id}",
                                  hint="check the spelling; for a private repo set HF_TOKEN") from None
    except (hub_errors.LocalEntryNotFoundError, OSError) as exc:
        raise HubError(f"could not fetch {repo_id}'s config.json ({type(exc).__name__})",
                       hint="check the network, or plan from a local model folder") from None


# --- for `edgepack pack --profile` -----------------------------------------------------------------


def plan_for_pack(source: str, profile: str, context: int | None, bits: int | None, revision: str | None,
                  gguf_file: str | None, quant_type: str | None, say: Callable[[str], None] | None,
                  double_quant: bool = False, prefer: str = "balanced") -> dict[str, Any]:
    """Plan for PROFILE, choosing by ``prefer``; return pack()'s bits, quant_type (None:
    ``default_quant_type``), dtype (``storage_dtype``), device_map, target_profile and plan."""
    from edgepack.errors import PlanError
    from edgepack.plan.profile import list_profiles, load_profile

    target = load_profile(profile)
    quant_type = quant_type or default_quant_type(target, double_quant)
    dtype = storage_dtype(target, quant_type)
    config, precision = load_source(source, revision, gguf_file)
    desc = describe_model(config, name=source)
    p = planner.plan(desc, target, context=context, bits=bits, quant_type=quant_type, double_quant=double_quant,
                     dtype=dtype, alternatives=_builtin_profiles(list_profiles), prefer=prefer, source=precision)
    if not p.fits:
        raise PlanError(f"--bits {bits} does not fit {target.name}: {p.reasons[0]}",
                        hint=" ".join(p.instead) or "leave out --bits to let the planner choose")
    if say:
        say(f"plan for {target.name}: {p.reasons[0]}")
    return {"bits": p.bits, "quant_type": quant_type, "dtype": dtype, "device_map": p.device_map,
            "target_profile": target.to_dict(), "plan": p.to_dict()}


def storage_dtype(target, quant_type: str) -> str:
    """What stays 16-bit, and the compute dtype: float16 when a GPU of the profile has no
    bfloat16 (Turing and older: ``"bf16": false``; cuBLAS has no bf16 GEMM below compute
    8.0), else bfloat16. int4 bundles run only on the CPU, whose kernels take bf16 scales."""
    if quant_type != "int4" and any(not g.bf16 for g in target.gpus):
        return "float16"
    return "bfloat16"


def default_quant_type(target, double_quant: bool = False) -> str:
    """4-bit type when none is given: edgepack's int4 on a CPU-only box (its fast CPU
    kernel; nf4 is dequantized in torch on every call there), nf4 where there is a GPU."""
    return "int4" if not target.has_gpu and not double_quant else "nf4"


def _builtin_profiles(list_profiles) -> list:
    from edgepack.errors import ProfileError

    try:
        return list_profiles()
    except ProfileError:
        return []  # suggestions are a nicety; a broken profiles folder must not stop planning


# --- CLI ------------------------------------------------------------------------------------------


def configure_parser(p) -> None:
    p.add_argument("source", help="Hub repo id, local model directory, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--profile", required=True, help="target device: a built-in profile name or a profile JSON file")
    p.add_argument("--context", type=int, default=None,
                   help="tokens of context to plan for (default: min(2048, the model's maximum))")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="longest prompt prefilled at once (default: the context)")
    p.add_argument("--batch", type=int, default=1, help="sequences generated at once (default 1)")
    p.add_argument("--bits", type=int, default=None, help="force 16, 8 or 4 and report whether it fits")
    p.add_argument("--prefer", choices=planner.PREFER, default="balanced",
                   help="how to choose among settings that fit: quality (most bits), balanced (fewest bits "
                        f"whose measured quality loss is within budget: mean KL <= {KL_BUDGET}), speed (fastest "
                        "predicted decode); never more bits than the source has")
    p.add_argument("--quant-type", default=None,
                   help="4-bit data type: nf4 or fp4 (bitsandbytes), or int4 (edgepack's CPU format); "
                        "default int4 on a CPU-only profile, else nf4")
    p.add_argument("--double-quant", action="store_true", help="4-bit: plan for quantized block scales")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside a local folder or Hub repo")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args) -> int:
    from edgepack.plan.profile import list_profiles, load_profile

    target = load_profile(args.profile)
    config, precision = load_source(args.source, args.revision, args.gguf_file)
    desc = describe_model(config, name=args.source)
    quant_type = args.quant_type or default_quant_type(target, args.double_quant)
    p = planner.plan(desc, target, context=args.context, prompt_tokens=args.prompt_tokens, batch=args.batch,
                     bits=args.bits, quant_type=quant_type, double_quant=args.double_quant,
                     dtype=storage_dtype(target, quant_type),
                     alternatives=_builtin_profiles(list_profiles), prefer=args.prefer, source=precision)
    if args.json:
        sys.stdout.write(json.dumps(p.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(printable(render(p, desc), newlines=True) + "\n")  # names come from the config
    return 0 if p.fits else 1


def render(p: planner.Plan, desc: ModelDescription) -> str:
    """The decision, a per-device table and the reasons, for a terminal."""
    head = "fits" if p.fits else "DOES NOT FIT"
    setting = f"{p.bits}-bit" + (f" {p.quant_type}" if p.quant_type else "") + (" + double quant" if p.double_quant else "")
    lines = [
        f"{desc.name} ({desc.model_type}, {desc.num_hidden_layers} layers, {desc.num_parameters / 1e6:.1f}M params) "
        f"on {p.profile}, context {p.context}, batch {p.batch}",
        f"source: {_source_text(p.source)}",
        f"decision: {setting}, {_placement(p)}: {head}"
        + (f"; ~{p.speed.tokens_per_s_empty:.0f} tokens/s predicted" if p.speed else "")
        + f" (--prefer {p.prefer})",
        "",
    ]
    cols = [("device", None), ("capacity", "capacity"), ("weights", "weights"), ("KV cache", "kv_cache"),
            ("activations", "activations"), ("loading", "loading"), ("allocator", "allocator"), ("baseline", "baseline"),
            ("CUDA ctx", "cuda_context"), ("headroom", "headroom"), ("total", "total"), ("", None)]
    rows = [[c for c, _ in cols]]
    for device, budget in p.devices.items():
        d = budget.to_dict()
        rows.append([device] + [_short(d[k]) for _, k in cols[1:-1]] + ["ok" if budget.fits else "OVER"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    lines.append("total = baseline + weights + CUDA ctx + max(loading, allocator + KV cache + activations) + headroom")
    lines.append(f"device_map: {_device_map_text(p.device_map)}")
    lines += [""] + _settings_table(p)
    lines += ["", "why:"] + [f"  - {r}" for r in p.reasons]
    if p.instead:
        lines += ["", "instead:"] + [f"  - {r}" for r in p.instead]
    return "\n".join(lines)


def _source_text(src: SourcePrecision) -> str:
    if src.bits is None:
        return f"precision {src.label}"
    if src.quantized:
        return f"already {src.bits}-bit ({src.label}; {src.detail})"
    return f"{src.bits}-bit ({src.label})"


def _settings_table(p: planner.Plan) -> list[str]:
    """Every setting weighed: fits, bytes, predicted decode speed, measured quality loss."""
    ctx = p.context
    rows = [["setting", "placement", "fits", "weights", "tok/s", f"tok/s @{ctx}", "mean KL", ""]]
    for s in p.settings:
        label = f"{s['bits']}-bit" + (f" {s['quant_type']}" if s["quant_type"] else "")
        sp = s["speed"]
        kl = s["expected_kl"]
        chosen = (s["bits"], s["strategy"]) == (p.bits, p.strategy)
        note = "chosen" if chosen else ("" if s["within_source_bits"] else "more bits than the source")
        rows.append([label, s["strategy"], "yes" if s["fits"] else "no", _short(s["weight_bytes"]),
                     f"{sp['tokens_per_s_empty']:.0f}" if sp else "?", f"{sp['tokens_per_s']:.0f}" if sp else "?",
                     "unmeasured" if kl is None else f"{kl:.5f}", note])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
           for r in rows]
    out.append(f"tok/s: predicted decode on an empty cache and at {ctx} tokens of context: bytes read a token "
               "(weights + KV cache) / the profile's read bandwidth x the engine's measured share of it")
    if any(x["speed"] is None for x in p.settings):
        out.append("?: the profile has no memory_bandwidth figure for that device; `edgepack profile` measures this box's")
    out.append(f"mean KL: the project's measured quality loss vs the source; --prefer balanced's budget: {KL_BUDGET}")
    if any(x.get("int8_activations") for x in p.settings):
        out.append("  (cpu rows: with the engine's int8 activations, its default on x86 with AVX2; `--activations float` "
                   f"at run time keeps 8-bit at {KL_8BIT} and int4 from Q4_0/Q4_1 at {KL_INT4_SAME_GRID}, for "
                   "slower decoding: 0.6x at 8 bits, 0.45x at int4 on this project's AVX2 box)")
    return out


def _placement(p: planner.Plan) -> str:
    devices = list(dict.fromkeys(p.device_map.values()))
    return "all on " + devices[0] if len(devices) == 1 else "split over " + ", ".join(devices)


def _short(n: int) -> str:
    if n == 0:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _device_map_text(device_map: dict[str, str]) -> str:
    """model.layers.0-29 -> cuda:0 instead of thirty lines."""
    groups: list[tuple[str, list[str]]] = []
    for name, device in device_map.items():
        if groups and groups[-1][0] == device:
            groups[-1][1].append(name)
        else:
            groups.append((device, [name]))
    return "; ".join(f"{_compress(names)} -> {device}" for device, names in groups)


def _compress(names: list[str]) -> str:
    out: list[str] = []
    run: list[str] = []
    for name in names + [""]:
        prefix, _, idx = name.rpartition(".")
        last = run[-1].rpartition(".") if run else ("", "", "")
        if run and idx.isdigit() and prefix == last[0] and int(idx) == int(last[2]) + 1:
            run.append(name)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else f"{run[0]}-{run[-1].rpartition('.')[2]}")
            run = []
        if idx.isdigit():
            run = [name]
        elif name:
            out.append(name)
    return ", ".join(out)
