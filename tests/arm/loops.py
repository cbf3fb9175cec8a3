"""The speed case for the ARM kernels on paper: cross-compiles arch/arm/*.c as setup.py does
(aarch64-linux-gnu-gcc -O3), disassembles each kernel and prints its hottest inner loop (the
most weights per instruction) and the instructions it spends per 64 weights.

A loop's weights are read off the vector instructions each weight passes once: a float FMA
(fmla) meets 4 weights, a conversion (scvtf, ucvtf) makes 4, a 16-bit multiply(-add) (smlal,
smull) meets 2 (4 products, two digits a weight), a table lookup (tbl) 8 (two a code), an
sdot takes 16 activation bytes, i.e. 16/3 weights at three activation bytes (dotprod.c's 24
bits). In the prompt tiles an fmla is 4 tokens x 1 weight, so they count weights x tokens. A
decode loop has no reason to store: its stores are accumulators GCC keeps in memory.

    python tests/arm/loops.py [--git REV] [--show KERNEL]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "edgepack" / "runtime" / "engine" / "csrc"
CC, OBJDUMP = "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump"
FLAGS = ["-O3", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno"]  # setup.py's
# kernel: {instruction: the weights (prompt tiles: weights x tokens) one stands for}
KERNELS = {
    "gemv_int8_i16": {"smlal": 2, "smlal2": 2, "smull": 2, "smull2": 2}, "gemv_int8": {"scvtf": 4},
    "gemv_bf16": {"fmla": 4}, "gemv_f16": {"fmla": 4}, "gemv_f32": {"fmla": 4},
    "int4_rows": {"ucvtf": 4, "tbl": 8}, "gemv_int8_dotprod": {"sdot": 16 / 3},
    "int4_rows_dotprod": {"sdot": 16 / 3}, "tile_8_3": {"fmla": 4},
}
LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
FUNC = re.compile(r"^[0-9a-f]+ <(\w+)>:$")
BRANCH = re.compile(r"^(b\.\w+|b|cbn?z|tbn?z)$")


# An int4 kernel's densest loop is its block loop, all that runs for large groups; at the
# default group of 32 a block is a group, so the loop that also turns the groups' bfloat16
# scales into float32 (a shift left by 16: shl, lsl) runs once a block (or once four).
def converts_scales(op: str, args: str) -> bool:
    return op in ("shl", "lsl") and args.endswith("#16")


def disassemble(source: Path, out: Path, csrc: Path = CSRC) -> dict[str, list[tuple[int, str, str]]]:
    obj = out / (source.stem + ".o")
    subprocess.run([CC, *FLAGS, f"-I{csrc}", "-c", str(source), "-o", str(obj)], check=True)
    text = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", str(obj)], check=True, capture_output=True, text=True).stdout
    funcs, cur = {}, None
    for line in text.splitlines():
        if m := FUNC.match(line):
            cur = funcs.setdefault(m.group(1), [])
        elif cur is not None and (m := LINE.match(line)):
            cur.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


def loops(code: list[tuple[int, str, str]]) -> list[list[tuple[int, str, str]]]:
    """every backward branch's body, innermost first"""
    found = []
    for at, op, args in code:
        if BRANCH.match(op):
            target = int(re.search(r"([0-9a-f]+) <", args).group(1), 16)
            if target <= at:
                found.append([c for c in code if target <= c[0] <= at])
    return sorted(found, key=len)


def figures(rev: str | None = None) -> list[tuple[str, list[tuple[int, str, str]], float]]:
    """(kernel, its loop, the weights one pass of it meets) for every kernel in KERNELS; int4
    kernels twice, the second (NAME@G32) at the default group of 32"""
    with tempfile.TemporaryDirectory() as tmp:
        csrc = CSRC
        if rev:  # the revision's csrc/ in a scratch copy
            root = CSRC.parents[3]
            csrc = Path(tmp) / "csrc"
            files = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", "--name-only", rev, str(CSRC)],
                                   check=True, capture_output=True, text=True).stdout.split()
            for f in files:
                dest = csrc / Path(f).relative_to(CSRC.relative_to(root))
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(subprocess.run(["git", "-C", str(root), "show", f"{rev}:{f}"], check=True,
                                                capture_output=True).stdout)
        funcs = {}
        for source in sorted((csrc / "arch" / "arm").glob("*.c")):
            funcs.update(disassemble(source, Path(tmp), csrc))
    rows = []
    for name, per in KERNELS.items():
        if name not in funcs:  # a kernel another revision lacks
            continue
        weights = lambda b: sum(per.get(op, 0) for _, op, a in b if "v" in a)  # noqa: E731 (vector registers only)
        found = [b for b in loops(funcs[name]) if weights(b)]
        block = max(found, key=lambda b: weights(b) / len(b))
        rows.append((name, block, weights(block)))
        if name.startswith("int4"):  # a loop holding the block loop runs it once a group of 32
            held = lambda b: weights(block) if block[0] in b else weights(b)  # noqa: E731
            grouped = [b for b in found if any(converts_scales(op, a) for _, op, a in b)]
            group = max(grouped, key=lambda b: held(b) / len(b))
            rows.append((name + "@G32", group, held(group)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--show", metavar="KERNEL", help="print this kernel's loop (NAME or NAME@G32)")
    ap.add_argument("--git", metavar="REV", help="the kernels of this git revision instead of the work tree")
    args = ap.parse_args()
    print(f"{'kernel':<24} {'loop insns':>10} {'weights':>8} {'per 64 w':>8} {'stores':>6}  mix")
    for name, body, weights in figures(args.git):
        stores = sum(op.startswith("st") for _, op, _ in body)
        mix = {}
        for _, op, _ in body:
            mix[op] = mix.get(op, 0) + 1
        top = " ".join(f"{op}:{n}" for op, n in sorted(mix.items(), key=lambda kv: -kv[1])[:8])
        print(f"{name:<24} {len(body):>10} {weights:>8.0f} {len(body) * 64 / weights:>8.1f} {stores:>6}  {top}")
        if args.show == name:
            for at, op, a in body:
                print(f"    {at:6x}  {op:<8} {a}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
