"""What runs on the GPU: one case per process, so each one's peak memory and CUDA context
are its own. check.py starts ``check.py --child CASE`` for each and reads the JSON it leaves
in WORK/results/.

With --cpu-dry-run the same functions run on the CPU (in check.py's process): the device
is "cpu", bundles are still placed through torch_model._place_on_devices (bitsandbytes'
modules, accelerate's hooks) instead of edgepack's CPU engine, and what only CUDA can
measure (torch.cuda peak, NVML, the memory-fraction limit) is left out and named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

GIB = 1 << 30
CARD_LIMIT_BYTES = 4 * GIB  # the 4 GB card: torch.cuda.set_per_process_memory_fraction


class Ctx:
    """Paths and settings shared by check.py and the cases (WORK/state.json)."""

    def __init__(self, work: Path, dry: bool):
        self.work, self.dry = work, dry
        self.state = json.loads((work / "state.json").read_text())
        self.results = work / "results"
        self.results.mkdir(exist_ok=True)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda:0"

    def ids(self, name: str) -> list[int]:
        return self.state["prompts"][name]

    def tensor(self, name: str):
        import torch

        return torch.load(self.work / "logits" / f"{name}.pt")

    def save_tensor(self, name: str, value) -> None:
        import torch

        (self.work / "logits").mkdir(exist_ok=True)
        torch.save(value.float().cpu(), self.work / "logits" / f"{name}.pt")

    def sync(self) -> None:
        if not self.dry:
            import torch

            torch.cuda.synchronize()


# --- loading -------------------------------------------------------------------------------


def load_edgepack(ctx: Ctx, bundle: Path, device_map: dict[str, str] | None = None):
    """A bundle as a torch module on ctx.device, or placed by ``device_map``.

    On a GPU with no device_map: ``edgepack.load``, which follows the bundle's planned map.
    Otherwise torch_model.build_model with that map; on the CPU (dry run) the CUDA
    placement code runs anyway, with "cpu" as its device."""
    from edgepack.format import bundle as bundle_format
    from edgepack import runtime
    from edgepack.runtime.torch import model as torch_model

    if not ctx.dry and device_map is None:
        return runtime.load(bundle, backend="torch").model
    manifest = bundle_format.verify_bundle(bundle, check_hashes=False)
    config = json.loads((bundle / "config.json").read_text())
    device_map = device_map or {k: ctx.device for k in manifest["device_map"]}
    os.environ["EDGEPACK_LEAN"] = "0"  # the lean decoder is for CPU-only loads: HF modules, as on a GPU
    try:
        model = torch_model.build_model(bundle, manifest, config, device_map)
    finally:
        del os.environ["EDGEPACK_LEAN"]
    if all(v == "cpu" for v in device_map.values()):
        torch_model._place_on_devices(model, manifest, device_map)
    return model


def load_seed(ctx: Ctx, source: Path):
    """The recipe edgepack replaces: quantize at load, placement by accelerate."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 device_map="auto").eval()
    model._edgepack_input_device = model.get_input_embeddings().weight.device  # where generate_tokens puts ids
    return model


def forward_logits(model, ids: list[int]):
    import torch

    device = getattr(model, "_edgepack_input_device", None) or next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=device)).logits[0]
    return out


def layer_kinds(model) -> dict[str, str]:
    """Class and device of the first decoder layer's q_proj: which kernels ran."""
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    last = model.get_submodule(f"model.layers.{len(model.model.layers) - 1}.self_attn.q_proj")
    return {"q_proj": type(q).__name__, "q_proj_device": str(q.weight.device), "last_q_proj": type(last).__name__,
            "last_q_proj_device": str(last.weight.device)}


def floating_dtypes(model) -> dict[str, int]:
    """Count of floating parameters/buffers per dtype (the no-bf16 check wants no bfloat16)."""
    counts: dict[str, int] = {}
    for _name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            counts[str(t.dtype).removeprefix("torch.")] = counts.get(str(t.dtype).removeprefix("torch."), 0) + 1
    return counts


# --- the cases -----------------------------------------------------------------------------


def case_probe(ctx: Ctx, _spec: dict) -> dict:
    """edgepack's own probe of this box (GPU, compute capability, bf16, bitsandbytes)."""
    from edgepack.plan.probe import probe

    return {"profile": probe("gpu-check", check_bitsandbytes=True)}


def case_run(ctx: Ctx, spec: dict) -> dict:
    """Load (an edgepack bundle on the GPU, or the seed recipe), logits on the check prompt,
    greedy decode speed, GPU memory."""
    import torch

    import measure

    if not ctx.dry:
        torch.cuda.reset_peak_memory_stats()
    if spec["kind"] == "seed":
        model = load_seed(ctx, Path(spec["source"]))
    else:
        model = load_edgepack(ctx, Path(spec["bundle"]), spec.get("device_map"))
    out: dict = {"layers": layer_kinds(model), "dtypes": floating_dtypes(model)}
    logits = forward_logits(model, ctx.ids("check"))
    out["logits_dtype"] = str(logits.dtype).removeprefix("torch.")
    ctx.save_tensor(spec["name"], logits)
    out.update(measure.decode_speed(model, ctx.ids("decode"), spec["new_tokens"], ctx.sync))
    if not ctx.dry:
        out["memory"] = measure.gpu_memory(0)
    return out


def case_card(ctx: Ctx, spec: dict) -> dict:
    """The 4 GB card: the planner's choice loaded under a 4 GiB allocator limit, then a prompt
    filling the planned context. It runs, or edgepack refuses before allocating; an OOM fails."""
    import torch

    from edgepack.errors import EdgepackError
    import measure

    if not ctx.dry:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CARD_LIMIT_BYTES / total), 0)
        torch.cuda.reset_peak_memory_stats()
    out: dict = {}
    try:
        model = load_edgepack(ctx, Path(spec["bundle"]))
        out["layers"] = layer_kinds(model)
        out["dtypes"] = floating_dtypes(model)
        out.update(measure.decode_speed(model, ctx.ids("card"), spec["new_tokens"], ctx.sync))
        out["outcome"] = "ran"
    except torch.OutOfMemoryError as exc:
        out["outcome"] = "OOM"
        out["error"] = str(exc).splitlines()[0][:200]
    except EdgepackError as exc:
        out["outcome"] = "refused"
        out["error"] = exc.message
    if not ctx.dry:
        out["memory"] = measure.gpu_memory(0)
    return out


CASES = {"probe": case_probe, "run": case_run, "card": case_card}


def run_case(ctx: Ctx, name: str) -> dict:
    """Run one case (spec in state.json) and write its result; errors are results too."""
    import traceback

    spec = ctx.state["cases"][name]
    try:
        result = {"ok": True, **CASES[spec["type"]](ctx, spec)}
    except Exception as exc:  # reported in the table, not raised: the other cases still run
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                  "traceback": traceback.format_exc()[-2000:]}
    (ctx.results / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result
