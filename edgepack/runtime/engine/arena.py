"""The engine's weights in memory: one anonymous map (huge pages where the kernel gives them),
each tensor read into the place the plan gave it (``_Plan`` in __init__), converted on the
way where the C code wants another layout (int4 pairs transposed, norms and biases to
float32, a bfloat16 table to float16)."""

from __future__ import annotations

import mmap

from edgepack.errors import BundleIntegrityError
from edgepack.format import bundle as bundle_format

try:  # absent where edgepack was installed without a C compiler (then nothing here runs)
    import edgepack.runtime.engine._engine as _native
except ImportError:
    _native = None

FLOATS = ("BF16", "F16", "F32")  # stored dtypes read as floats (16-bit weights, tables, norms, biases)


def weight_map(nbytes: int) -> mmap.mmap:
    """Anonymous memory for the weights. Huge pages where the kernel gives them on request
    (THP "madvise"): each decode step streams every weight, and 2 MiB pages take ~500x fewer
    TLB entries than 4 KiB ones; they also come in ~500x fewer faults. Elsewhere MAP_POPULATE:
    the kernel faults the pages in at once (~40k page faults one by one under the reads otherwise)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    huge = hasattr(mmap, "MADV_HUGEPAGE")
    arena = mmap.mmap(-1, max(nbytes, 1), flags=flags if huge else flags | getattr(mmap, "MAP_POPULATE", 0))
    if huge:
        try:
            arena.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP off in this kernel
            pass
    return arena


def read_tensors(shards: dict, header: dict, plan, arena: mmap.mmap) -> None:
    """Each tensor with one read into its place (or into scratch, for those converted or
    transposed on the way). Plain reads, not a map of the file: a file truncated while
    mapped kills the process with SIGBUS (see torch_model.read_shard)."""
    view, base = memoryview(arena), _native.address(arena)
    scratch = bytearray()
    for rel, (f, data_start) in shards.items():
        names = sorted((k for k, v in header.items() if v["file"] == rel), key=lambda k: header[k]["data_offsets"][0])
        for name in names:
            info, slot = header[name], plan.slots[name]
            start, end = info["data_offsets"]
            if slot.offset is not None and not slot.pairs:  # as stored, straight into place
                bundle_format.read_exact_into(f, data_start + start, view[slot.offset : slot.offset + end - start], rel)
                if slot.divide != 1.0:
                    at = base + slot.offset
                    _native.convert(at, _native.F32, at, _native.F32, (end - start) // 4, slot.divide)
                continue
            if len(scratch) < end - start:
                scratch = bytearray(end - start)
            bundle_format.read_exact_into(f, data_start + start, memoryview(scratch)[: end - start], rel)
            _place_converted(name, info, slot, _native.address(scratch), base)


def _place_converted(name: str, info: dict, slot, src: int, base: int) -> None:
    if slot.pairs:  # int4 pairs [groups, rows] -> rows pairs_row0.. of [all rows, groups]
        groups, rows = slot.shape[0], slot.shape[1]
        _native.transpose32(src, groups, rows, base + slot.offset + slot.pairs_row0 * groups * 4)
        return
    if info["dtype"] not in FLOATS:  # norms and biases: float32 copies
        raise BundleIntegrityError(
            f"tensor {name!r} is {info['dtype']}; a floating-point norm or bias was expected",
            hint="the bundle's config and weights disagree; pack the model again",
        )
    n = (info["data_offsets"][1] - info["data_offsets"][0]) // bundle_format.DTYPE_BYTES[info["dtype"]]
    _native.convert(src, getattr(_native, info["dtype"]), base + slot.offset32, _native.F32, n)


def half_table(plan, arena: mmap.mmap) -> None:
    """A bfloat16 embedding table / head converted to float16 in place, as lean.py does (logits
    rounded to 11 significant bits, not 8: SmolLM2-135M 8-bit mean KL to the source 0.00200 ->
    0.00156); kept bfloat16 when a value is too large for float16."""
    base, n = _native.address(arena), plan.head.rows * plan.head.cols  # both [vocab, hidden]
    tied = plan.head.weight == plan.embed

    def to_half(offset: int) -> bool:
        return _native.convert(base + offset, _native.BF16, base + offset, _native.F16, n)

    if plan.embed_dtype == "BF16" and to_half(plan.embed):
        plan.embed_dtype = "F16"
        if tied:
            plan.head.kind = "F16"
    if not tied and plan.head.kind == "BF16" and to_half(plan.head.weight):
        plan.head.kind = "F16"
