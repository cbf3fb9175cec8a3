"""The GPU check of issue 21: edgepack's CUDA path, measured, in one run. See README.md.

    bash tests/gpu/run.sh                 # on a CUDA box, < 8 min on an H100
    bash tests/gpu/run.sh --cpu-dry-run   # the same steps on the CPU with tiny shapes (CI)

Steps: write source models from configs (random weights at SmolLM2-135M's and a 1B
Llama's shapes); pack them for a GPU profile at 8 bits and nf4, for the 4 GB card's
profile (planner's choice) and for a profile without bfloat16; verify each; compute the
float32 source's logits and each bundle's on the CPU; then, one process per case, load
on the GPU and compare, time decoding, read GPU memory, beside the seed recipe; print one
table and exit 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cases
import measure
import models

# bitsandbytes warns on every int8 matmul whose input is not float16 (bf16 bundles, CPU runs)
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
# Relative L2 distance of logits (all prompt positions) allowed between the GPU run and the
# same bundle on the CPU. 16-bit and nf4: both sides multiply the same 16-bit weights (nf4
# dequantized by bitsandbytes' CUDA kernel on one side, edgepack's torch code on the other,
# one codebook); what differs is rounding of 16-bit activations in another order, the 5%
# the exporter allows bf16 rounding over a few dozen layers (exporter.LOGITS_RTOL).
# 8-bit: on CUDA, bitsandbytes' Linear8bitLt also rounds each activation row to int8
# before its int8 GEMM (the CPU keeps activations in float): ~0.4% per matmul on top, ~7
# matmuls a layer, so twice that.
TOL_VS_CPU = {16: 0.05, 8: 0.10, 4: 0.05}
# vs the float32 source: the GPU's rounding is independent of the bundle's quantization
# error, so the two add in quadrature: sqrt(cpu_vs_source^2 + TOL_VS_CPU^2), +10% slack.
SOURCE_SLACK = 1.10
VRAM_TARGET = 0.10  # the planner's predicted VRAM vs NVML's process total: within +-10%


def settings(dry: bool) -> dict:
    """Model shapes and token counts: real shapes on a GPU, tiny ones for the CPU dry run."""
    if dry:
        return {"small": "tiny", "large": "tiny-wide", "check_tokens": 24, "decode_tokens": 16, "new_tokens": 8,
                "card_context": 256, "card_new": 8, "child_timeout_s": 300}
    return {"small": "smollm2-135m", "large": "llama-1b", "check_tokens": 64, "decode_tokens": 64, "new_tokens": 64,
            "card_context": None, "card_new": 16, "child_timeout_s": 240}


# --- preparing: sources, profiles, bundles, CPU references --------------------------------------


def gpu_profile(work: Path, dry: bool, probe_result: dict | None) -> Path:
    """The profile the bundles are packed for: this box as edgepack probes it (dry run: the
    built-in rtx4090-24gb), with reserved_bytes 0 so that the planner adds its CUDA-context
    estimate and its peak predicts the process's whole VRAM."""
    from edgepack.plan.profile import load_profile

    d = probe_result if probe_result is not None else load_profile("rtx4090-24gb").to_dict()
    d = json.loads(json.dumps(d))
    d["name"] = "gpu-check"
    for g in d["gpus"]:
        g["reserved_bytes"] = 0
    path = work / "gpu-check.json"
    path.write_text(json.dumps(d, indent=1) + "\n")
    return path


def card_profile(work: Path, dry: bool, source: Path) -> str:
    """gtx1650-4gb; in the dry run a copy shrunk so the tiny model fits quantized but not at
    16 bits (the real profile holds it at any size), so the planner must choose."""
    if not dry:
        return "gtx1650-4gb"
    from edgepack.cli import plan as plan_cli
    from edgepack.plan import planner
    from edgepack.plan.profile import load_profile

    d = load_profile("gtx1650-4gb").to_dict()
    desc = plan_cli.describe_model(plan_cli.load_config(str(source)))
    need = {b: planner.place(desc, d, b, "gpu", context=settings(dry)["card_context"], dtype="float16")
            .devices["cuda:0"].total_bytes for b in (16, 8)}
    d.update(name="card-dry-run")
    d["gpus"][0]["memory_bytes"] = d["gpus"][0]["reserved_bytes"] + (need[16] + need[8]) // 2
    path = work / "card-dry-run.json"
    path.write_text(json.dumps(d, indent=1) + "\n")
    return str(path)


def pack_for(source: Path, out: Path, profile: str, bits: int | None, quant_type: str | None, context: int | None) -> dict:
    """What `edgepack pack SOURCE -o OUT --profile P [--bits B] [--quant-type Q] --context C
    --no-smoothing --no-gptq` does (smoothing and GPTQ change only the codes' values, and on
    random weights they would cost minutes of the budget, not prove anything on the GPU)."""
    from edgepack.cli import plan as plan_cli
    from edgepack.export.pack import pack

    options = plan_cli.plan_for_pack(str(source), profile, context, bits, None, None, quant_type, None)
    return pack(str(source), out, bits=options.pop("bits"), quant_type=options.pop("quant_type"),
                dtype=options.pop("dtype", "bfloat16"), smoothing=False, gptq=False, force=True, **options)


def cpu_logits(bundle: Path, ids: list[int]):
    """The bundle on this box's CPU as a user gets it (edgepack's engine where it runs it)."""
    from edgepack import runtime
    from edgepack.export import quantize

    lm = runtime.load(bundle, device="cpu", force=True)
    with __import__("torch").inference_mode():
        return quantize.logits(lm.model, ids), lm.backend


def source_logits(source: Path, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def predicted(source: Path, profile: str, bits: int, quant_type: str, dtype: str, context: int, prompt: int) -> dict:
    """The planner's cuda:0 figures for this run's context (the whole process: it includes
    the CUDA context estimate, since the profile reserves nothing)."""
    from edgepack.cli import plan as plan_cli
    from edgepack.plan import planner
    from edgepack.plan.profile import load_profile

    desc = plan_cli.describe_model(plan_cli.load_config(str(source)))
    p = planner.place(desc, load_profile(profile), bits, "gpu", context=context, prompt_tokens=prompt,
                      quant_type=quant_type, dtype=dtype)
    gpu = p.devices["cuda:0"]
    return {"peak": gpu.peak_bytes, "tensors": gpu.peak_bytes - gpu.cuda_context_bytes, "fits": p.fits}


# --- the checks ------------------------------------------------------------------------------------


class Table:
    def __init__(self):
        self.rows: list[list[str]] = []

    def add(self, case: str, check: str, measured: str, limit: str, ok: bool | None) -> None:
        result = {True: "PASS", False: "FAIL", None: "info"}[ok]
        self.rows.append([case, check, measured, limit, result])

    def skip(self, case: str, check: str, why: str) -> None:
        self.rows.append([case, check, "-", why, "SKIP"])

    @property
    def failed(self) -> int:
        return sum(r[4] == "FAIL" for r in self.rows)

    def render(self) -> str:
        head = ["case", "check", "measured", "limit / predicted", "result"]
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(5)]
        line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), "-+-".join("-" * w for w in widths), *map(line, self.rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="run every step on the CPU with tiny shapes")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        cases.run_case(cases.Ctx(args.work, args.cpu_dry_run), args.child)
        return 0
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return run(args.work, args.cpu_dry_run)
    with tempfile.TemporaryDirectory(prefix="edgepack-gpu-check-") as tmp:
        return run(Path(tmp), args.cpu_dry_run)


def say(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(work: Path, dry: bool) -> int:
    import torch

    started = time.perf_counter()
    s = settings(dry)
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device is visible to torch\nhint: run on a CUDA box, or pass --cpu-dry-run", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("EDGEPACK_CACHE", str(work / "cache"))
    state: dict = {"prompts": {}, "cases": {}}
    src = {}
    for role in ("small", "large"):
        say(f"writing the {s[role]} source model")
        src[role] = models.write_model(s[role], work / "src" / role)
    tokenizer = models.make_tokenizer()
    state["prompts"] = {"check": models.prompt_ids(tokenizer, s["check_tokens"]),
                        "decode": models.prompt_ids(tokenizer, s["decode_tokens"])}
    table = Table()
    probe = None
    if not dry:  # edgepack's probe of this GPU, in a child like every CUDA step
        state["cases"]["probe"] = {"type": "probe", "name": "probe"}
        save_state(work, state)
        probe = child(work, "probe", dry, s["child_timeout_s"]).get("profile")
        if probe is None or not probe.get("gpus"):
            table.add("probe", "edgepack profile sees the GPU", "no GPU in the probe", "1 GPU", False)
        else:
            g = probe["gpus"][0]
            table.add("probe", "edgepack profile sees the GPU", f"{g['name']}, cc {g['compute_capability']}, "
                      f"bf16 {g['bf16']}, bnb cuda {probe['bitsandbytes']['cuda']}", "bnb cuda true",
                      probe["bitsandbytes"]["cuda"] is True)
    profile = str(gpu_profile(work, dry, probe if probe and probe.get("gpus") else None))
    card = card_profile(work, dry, src["large"])
    run_context = s["decode_tokens"] + s["new_tokens"]
    packs = {  # name: (source, profile, bits, quant_type, context)
        "small-8bit": ("small", profile, 8, None, run_context),
        "small-nf4": ("small", profile, 4, "nf4", run_context),
        "large-8bit": ("large", profile, 8, None, run_context),
        "large-nf4": ("large", profile, 4, "nf4", run_context),
        "small-t4-8bit": ("small", "t4", 8, None, run_context),  # t4: "bf16": false
        "large-4gb-card": ("large", card, None, None, s["card_context"]),  # the planner's choice
    }
    bundles: dict[str, dict] = {}
    for name, (role, prof, bits, qt, ctx_tokens) in packs.items():
        say(f"packing {name}")
        out = work / "bundles" / name
        t0 = time.perf_counter()
        try:
            manifest = pack_for(src[role], out, prof, bits, qt, ctx_tokens)
            from edgepack.format import bundle as bundle_format

            bundle_format.verify_bundle(out, check_hashes=True)
        except Exception as exc:
            table.add(name, "pack + verify", f"{type(exc).__name__}: {str(exc)[:80]}", "packs", False)
            continue
        q = manifest["quantization"]
        bundles[name] = {"path": out, "role": role, "manifest": manifest, "profile": prof}
        placed = sorted(set(manifest["device_map"].values()))
        table.add(name, "pack + verify", f"{q['bits']}-bit {q['scheme']} {q['storage_dtype']}, "
                  f"{manifest['memory']['weight_bytes'] / 1e6:.0f} MB, map {'+'.join(placed)}, "
                  f"{time.perf_counter() - t0:.0f} s", "verified", True)
    say("float32 source and CPU logits")
    ids = state["prompts"]["check"]
    ref = {role: source_logits(path, ids) for role, path in src.items()}
    (work / "logits").mkdir(exist_ok=True)
    for name, b in bundles.items():
        got, backend = cpu_logits(b["path"], ids)
        b["cpu_vs_source"] = measure.rel_l2(got, ref[b["role"]])
        b["cpu_backend"] = backend
        torch.save(got, work / "logits" / f"cpu-{name}.pt")
    for role in src:
        torch.save(ref[role], work / "logits" / f"source-{role}.pt")
    add_cases(state, s, bundles, src)
    save_state(work, state)
    results = {}
    for name in state["cases"]:
        if name == "probe":
            continue
        say(f"case {name}")
        results[name] = child(work, name, dry, s["child_timeout_s"])
    from report import evaluate

    evaluate(table, work, dry, s, state, bundles, results, src)
    print(table.render())
    total_s = time.perf_counter() - started
    print(f"\n{'CPU dry run' if dry else torch.cuda.get_device_name(0)}: {len(table.rows)} rows, "
          f"{table.failed} failed, {total_s:.0f} s")
    return 1 if table.failed else 0


def add_cases(state: dict, s: dict, bundles: dict, src: dict) -> None:
    c = state["cases"]
    for name in ("small-8bit", "small-nf4", "large-8bit", "large-nf4", "small-t4-8bit"):
        if name in bundles:
            c[f"gpu:{name}"] = {"type": "run", "kind": "edgepack", "name": f"gpu-{name}",
                                "bundle": str(bundles[name]["path"]), "new_tokens": s["new_tokens"]}
    for role in ("small", "large"):
        c[f"seed:{role}"] = {"type": "run", "kind": "seed", "name": f"seed-{role}", "source": str(src[role]),
                             "new_tokens": s["new_tokens"]}
    if "small-8bit" in bundles:
        c["split:small-8bit"] = {"type": "run", "kind": "edgepack", "name": "split-small-8bit",
                                 "bundle": str(bundles["small-8bit"]["path"]), "new_tokens": s["new_tokens"],
                                 "device_map": split_map(bundles["small-8bit"]["manifest"], s)}
    if "large-4gb-card" in bundles:
        m = bundles["large-4gb-card"]["manifest"]
        context = m["plan"]["context"]
        state["prompts"]["card"] = models.prompt_ids(models.make_tokenizer(), context - s["card_new"])
        c["card:large-4gb-card"] = {"type": "card", "name": "card", "bundle": str(bundles["large-4gb-card"]["path"]),
                                    "new_tokens": s["card_new"]}


def split_map(manifest: dict, s: dict) -> dict[str, str]:
    """The first half of the decoder layers (with the embeddings and the output layer tied
    to them) on the GPU, the second half and the final norm on the CPU. Dry run: "cpu" for
    both halves, through the same placement code."""
    gpu = "cpu" if s["small"] == "tiny" else "cuda:0"
    layers = [k for k in manifest["device_map"] if k.startswith("model.layers.")]
    first = set(layers[: len(layers) // 2])
    out = {}
    for key in manifest["device_map"]:
        on_gpu = key in first or key in ("model.embed_tokens", "lm_head") or key not in layers and "norm" not in key
        out[key] = gpu if on_gpu else "cpu"
    return out


def save_state(work: Path, state: dict) -> None:
    (work / "state.json").write_text(json.dumps(state, default=str) + "\n")


def child(work: Path, name: str, dry: bool, timeout_s: int) -> dict:
    """Run one case: in its own process on a GPU; in this one for the dry run (no GPU
    memory to keep apart, and ~3 s of imports saved per case)."""
    if dry:
        return cases.run_case(cases.Ctx(work, dry), name)
    cmd = [sys.executable, str(Path(__file__)), "--work", str(work), "--child", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s} s"}
    path = work / "results" / f"{name}.json"
    if not path.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"ok": False, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
