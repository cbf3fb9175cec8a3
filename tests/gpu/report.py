"""Turn the cases' results into the check table's rows (check.py prints it)."""

from __future__ import annotations

import math
from pathlib import Path

import measure
from check import SOURCE_SLACK, TOL_VS_CPU, VRAM_TARGET, predicted

CUDA_ONLY = "CUDA only: not measured in the CPU dry run"
KERNELS = {8: "Linear8bitLt", 4: "Linear4bit", 16: "Linear"}


def evaluate(table, work: Path, dry: bool, s: dict, state: dict, bundles: dict, results: dict, src: dict) -> None:
    import torch

    def logits(name: str):
        return torch.load(work / "logits" / f"{name}.pt")

    device = "cpu" if dry else "cuda:0"
    seed_speed = {role: results.get(f"seed:{role}", {}).get("tok_s") for role in src}
    for case, r in results.items():
        kind, _, name = case.partition(":")
        if not r.get("ok"):
            table.add(name, f"{kind}: runs", r.get("error", "?")[:110], "no error", False)
            continue
        if kind == "seed":
            seed_rows(table, dry, s, work, name, r, src[name], logits(f"seed-{name}"), logits(f"source-{name}"))
            continue
        b = bundles[name]
        q = b["manifest"]["quantization"]
        label = "split" if kind == "split" else ("GPU" if not dry else "placed (CPU)")
        lay = r["layers"]
        where, last = lay["q_proj_device"], lay["last_q_proj_device"]
        ok = lay["q_proj"] == lay["last_q_proj"] == KERNELS[q["bits"]] and where.startswith(device)
        ok = ok and last.startswith("cpu" if kind == "split" else device)
        table.add(name, f"{label}: bitsandbytes modules", f"{lay['q_proj']} on {where}, last layer's on {last}",
                  f"{KERNELS[q['bits']]} on {device}" + (", last on cpu" if kind == "split" else ""), ok)
        if kind == "card":
            card_rows(table, dry, name, r, b)
            continue
        tol = TOL_VS_CPU[q["bits"]]
        got = logits(f"{kind}-{name}")
        if kind == "split":
            d = measure.rel_l2(got, logits(f"gpu-{name}"))
            table.add(name, "split map: logits vs all-GPU", f"rel {d:.4f}", f"<= {tol}", d <= tol)
            continue
        d_cpu = measure.rel_l2(got, logits(f"cpu-{name}"))
        table.add(name, f"logits vs same bundle on CPU ({b['cpu_backend']})", f"rel {d_cpu:.4f}, top1 "
                  f"{measure.top1(got, logits(f'cpu-{name}')):.0%}", f"<= {tol}", d_cpu <= tol)
        c = b["cpu_vs_source"]
        limit = math.hypot(c, tol) * SOURCE_SLACK
        d_src = measure.rel_l2(got, logits(f"source-{b['role']}"))
        table.add(name, "logits vs float32 source", f"rel {d_src:.4f} (CPU: {c:.4f})", f"<= {limit:.4f}", d_src <= limit)
        if q["storage_dtype"] == "float16":
            bf16 = r["dtypes"].get("bfloat16", 0)
            table.add(name, "no bf16: float16 storage + compute", f"storage {q['storage_dtype']}, logits "
                      f"{r['logits_dtype']}, {bf16} bf16 tensors", "float16, 0 bf16",
                      q["compute_dtype"] == "float16" and r["logits_dtype"] == "float16" and bf16 == 0)
        seed = seed_speed.get(b["role"])
        table.add(name, "decode tok/s (greedy)", f"{r['tok_s']:.1f} (first token {r['prompt_s']:.2f} s)",
                  f"seed recipe: {seed:.1f}" if seed else "seed recipe: -", None)
        bits, qt = q["bits"], q.get("quant_type") or "nf4"
        plan = predicted(src[b["role"]], str(work / "gpu-check.json"), bits, qt, q["storage_dtype"],
                         s["decode_tokens"] + s["new_tokens"], s["decode_tokens"])
        vram_rows(table, dry, name, r.get("memory"), plan)


def vram_rows(table, dry: bool, name: str, mem: dict | None, plan: dict) -> None:
    """NVML's process total against the planner's peak (the check), torch's tensor peak
    against the planner's peak less its CUDA-context estimate (shown)."""
    if dry or mem is None:
        table.skip(name, "VRAM vs plan (NVML process total)", f"{CUDA_ONLY}; plan {measure.mib(plan['peak'])} MiB")
        return
    ok = measure.within(mem["process"], plan["peak"], VRAM_TARGET)
    table.add(name, f"VRAM vs plan ({mem['process_source']})", f"{measure.mib(mem['process'])} MiB",
              f"plan {measure.mib(plan['peak'])} MiB +-{VRAM_TARGET:.0%}", ok)
    table.add(name, "torch peak allocated vs plan less CUDA ctx", f"{measure.mib(mem['max_allocated'])} MiB",
              f"plan {measure.mib(plan['tensors'])} MiB", None)


def seed_rows(table, dry: bool, s: dict, work: Path, role: str, r: dict, source: Path, got, want) -> None:
    label = f"seed:{role}"
    table.add(label, "seed recipe (load_in_8bit, device_map auto)", f"{r['layers']['q_proj']} on "
              f"{r['layers']['q_proj_device']}; logits vs source rel {measure.rel_l2(got, want):.4f}", "-", None)
    table.add(label, "decode tok/s (greedy)", f"{r['tok_s']:.1f} (first token {r['prompt_s']:.2f} s)", "-", None)
    plan = predicted(source, str(work / "gpu-check.json"), 8, "nf4", "bfloat16",
                     s["decode_tokens"] + s["new_tokens"], s["decode_tokens"])
    mem = r.get("memory")
    if dry or mem is None:
        table.skip(label, "VRAM (NVML process total)", f"{CUDA_ONLY}; 8-bit plan {measure.mib(plan['peak'])} MiB")
        return
    table.add(label, f"VRAM ({mem['process_source']})", f"{measure.mib(mem['process'])} MiB "
              f"(torch peak {measure.mib(mem['max_allocated'])})", f"8-bit plan {measure.mib(plan['peak'])} MiB", None)


def card_rows(table, dry: bool, name: str, r: dict, b: dict) -> None:
    m = b["manifest"]
    plan = m["plan"]
    devices = sorted(set(m["device_map"].values()))
    q = m["quantization"]
    table.add(name, "4 GB card: planner's choice", f"{q['bits']}-bit {q['storage_dtype']} on {'+'.join(devices)}",
              "below 16 bits", q["bits"] < 16)
    outcome = r.get("outcome")
    context = plan["context"]
    limit = "under a 4 GiB allocator limit" if not dry else "no limit (CUDA only)"
    detail = f"{outcome}: {context}-token context" + (f" ({r['error']})" if r.get("error") else "")
    if outcome == "ran":
        detail += f", {r['tok_s']:.1f} tok/s"
    table.add(name, f"4 GB card: runs or refuses, {limit}", detail[:120], "ran or refused (no OOM)",
              outcome in ("ran", "refused"))
    gpu = plan["devices"].get("cuda:0")
    mem = r.get("memory")
    if gpu is None:
        table.add(name, "4 GB card: VRAM vs plan", "plan has no GPU", "-", None)
    elif dry or mem is None:
        table.skip(name, "4 GB card: VRAM vs plan", f"{CUDA_ONLY}; plan {measure.mib(gpu['peak'])} MiB")
    else:
        ok = measure.within(mem["process"], gpu["peak"] + gpu_context_missing(m), VRAM_TARGET)
        table.add(name, f"4 GB card: VRAM vs plan ({mem['process_source']})", f"{measure.mib(mem['process'])} MiB "
                  f"(torch peak {measure.mib(mem['max_allocated'])})",
                  f"plan {measure.mib(gpu['peak'] + gpu_context_missing(m))} MiB +-{VRAM_TARGET:.0%}", ok)


def gpu_context_missing(manifest: dict) -> int:
    """gtx1650-4gb's 1 GiB reserve holds the CUDA context, so its plan leaves the context
    out of cuda:0's peak; the process total here includes it: add the planner's estimate."""
    from edgepack.plan import sizing

    gpu = manifest["plan"]["devices"]["cuda:0"]
    return sizing.CUDA_CONTEXT_BYTES - gpu["cuda_context"]
