"""The engine's C code on aarch64, tested on this x86 box: tests/arm/driver.c and csrc/
(without the Python bindings) cross-built statically, run under qemu-aarch64 as a Raspberry
Pi 4 (cortex-a72: NEON), a Pi 5 (cortex-a76: NEON + sdot) and a newest core (max: i8mm,
bf16). Each runs the same bundles (int8, int4, 16-bit) the x86 engine loads here, laid out
in memory by the same loader, through prompts of 1, 7, 97 and 130 tokens (CHUNK 96: a ragged
tail) and decode steps; the logits must be a float64 Llama's within 1e-4 of the largest, as
on x86. Emulation says nothing about speed. `bash tests/arm/run.sh` installs the tools and
runs this file."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edgepack
from edgepack.runtime import engine as native

CSRC = Path(edgepack.__file__).parent / "runtime" / "engine" / "csrc"
HERE = Path(__file__).parent
CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
FLAGS = ["-O3", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno", "-pthread", "-static"]  # setup.py's, static
CPUS = {"cortex-a72": "neon", "cortex-a76": "neon-dotprod", "max": "neon-dotprod"}  # the kernel set each must pick
PROMPTS = (1, 7, 97, 130)
STEPS = 5  # decode steps after the longest prompt
CONTEXT = 160

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which(CC) and shutil.which(QEMU)), reason=f"needs {CC} and {QEMU} (tests/arm/run.sh installs them)"),
]


def build(out: Path, *defines: str) -> Path:
    sources = [str(p) for p in sorted(CSRC.rglob("*.c")) if p.name != "module.c"]
    subprocess.run([CC, *FLAGS, *defines, f"-I{CSRC}", str(HERE / "driver.c"), *sources, "-lm", "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("arm") / "driver")


def qemu(cpu: str, *args: str) -> str:
    done = subprocess.run([QEMU, "-cpu", cpu, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Llama, larger than tiny.py's where the kernels care: 130-token prompts (256
    positions), hidden 96 (three int4 groups, six 16-column steps), untied head."""
    from tiny import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)  # decisive logits, as tiny.py's models
    path = tmp_path_factory.mktemp("arm-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _mat(t: tuple, base: int) -> bytes:
    kind, rows, cols, w, scale, bias, *group = t
    off = lambda a: -1 if a is None else a - base  # noqa: E731
    return struct.pack("<4i3q", kind, rows, cols, group[0] if group else 0, off(w), off(scale), off(bias))


def export(bundle: Path, dest: Path) -> tuple[Path, object]:
    """The bundle as the x86 engine laid it out in memory, in driver.c's MODEL format; and
    the engine's model."""
    seen = {}
    real = native._native

    class Recorder:  # the engine's call to the C module's new(), recorded
        def __getattr__(self, name):
            return getattr(real, name)

        def new(self, *args):
            seen["args"] = args
            return real.new(*args)

    native._native = Recorder()
    try:
        lm = edgepack.load(bundle)
    finally:
        native._native = real
    assert lm.backend == "native"
    (hidden, heads, kv_heads, head_dim, inter, vocab), eps, (embed_type, embed), norm, head, layers = seen["args"]
    engine = lm.model
    base = real.address(engine.arena)
    out = [b"EPARM1\0\0", struct.pack("<10i2f2q", hidden, heads, kv_heads, head_dim, inter, vocab, len(layers),
                                      embed_type, CONTEXT, 0, eps, engine.rope_theta, embed - base, norm - base)]
    out.append(_mat(head, base))
    for in_norm, post_norm, *mats in layers:
        out.append(struct.pack("<2q", in_norm - base, post_norm - base))
        out.extend(_mat(m, base) for m in mats)
    out.append(struct.pack("<q", len(engine.arena)))
    out.append(bytes(engine.arena))
    dest.write_bytes(b"".join(out))
    return dest, lm


def calls(ids: list[int]) -> tuple[bytes, list[int]]:
    """driver.c's CALLS: each prompt from an empty cache, then steps after the longest; and
    the position whose logits each call must give"""
    out, want = [], []
    for n in PROMPTS:
        out.append(struct.pack(f"<2i{n}i", 1, n, *ids[:n]))
        want.append(n - 1)
    for t in range(PROMPTS[-1], PROMPTS[-1] + STEPS):
        out.append(struct.pack("<3i", 0, 1, ids[t]))
        want.append(t)
    return struct.pack("<i", len(out)) + b"".join(out), want


@pytest.fixture(scope="module")
def bundles(llama, tmp_path_factory):
    """{name: (model file, calls file, float64 logits the calls must give)}"""
    from edgepack.export.pack import pack
    sys.path.insert(0, str(HERE.parent / "runtime" / "engine"))  # the float64 Llama of the x86 engine tests
    from test_native import _float64_logits

    root = tmp_path_factory.mktemp("arm-bundles")
    out = {}
    for name, bits, options in (("int8", 8, {}), ("int4", 4, {"quant_type": "int4"}), ("16-bit", 16, {})):
        bundle = root / name
        pack(str(llama), bundle, bits=bits, table_bits=16, **options)  # MODEL files carry no table scales
        model_file, lm = export(bundle, root / f"{name}.model")
        ids = (lm.tokenizer.encode("Water boils at one hundred degrees, and ice melts at zero. ") * 30)[: PROMPTS[-1] + STEPS]
        blob, want = calls(ids)
        (root / f"{name}.calls").write_bytes(blob)
        exact = _float64_logits(edgepack.load(bundle, backend="torch").model, ids)
        out[name] = (model_file, root / f"{name}.calls", exact[want])
    return out


def _compare(driver: Path, cpu: str, model: Path, calls_file: Path, exact: torch.Tensor, tmp: Path) -> float:
    out = tmp / f"{cpu}.logits"
    printed = qemu(cpu, driver, model, calls_file, out, 2)
    assert f"kernels: {CPUS[cpu]}\n" in printed, printed
    got = torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.float32).double().view(exact.shape)
    return ((got - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("cpu", list(CPUS))
def test_kernels_match_double_sums(driver, cpu):
    """Every kernel set this CPU model runs, every weight type, shapes off the 4-row and
    16-column units: driver.c --kernels checks them against double-precision sums."""
    printed = qemu(cpu, driver, "--kernels")
    print(f"\n[{cpu}]\n{printed}", end="")
    sets = {line.split()[0] for line in printed.splitlines()}
    assert sets == ({"neon", "generic"} | ({"neon-dotprod"} if CPUS[cpu] == "neon-dotprod" else set()))


@pytest.mark.parametrize("cpu", list(CPUS))
@pytest.mark.parametrize("weights", ["int8", "int4", "16-bit"])
def test_engine_matches_float64_llama(driver, bundles, cpu, weights, tmp_path):
    """Prompts of 1, 7, 97 (a chunk and one) and 130 tokens, then decode steps: the logits
    within 1e-4 of the largest of a float64 Llama's, on the kernel set the CPU picks."""
    model, calls_file, exact = bundles[weights]
    err = _compare(driver, cpu, model, calls_file, exact, tmp_path)
    print(f"\n{cpu:<11} {CPUS[cpu]:<13} {weights:<7} worst logit error {err:.1e} of the largest", end="")
    assert err <= 1e-4


def test_fewer_activation_bits_miss_the_bound(bundles, tmp_path):
    """What the dot-product set's 24-bit activations buy: built with 8 (llama.cpp's Q8_0 x
    Q8_0) or 16 bits per activation, the same bundles' logits miss the 1e-4 bound or come
    close to it."""
    worst = {}
    for bits in (8, 16):
        q = build(tmp_path / f"driver-{bits}", f"-DEP_ACT_BITS={bits}")
        for weights in ("int8", "int4"):
            model, calls_file, exact = bundles[weights]
            worst[bits, weights] = _compare(q, "cortex-a76", model, calls_file, exact, tmp_path)
            print(f"\ncortex-a76  {bits}-bit activations {weights:<5} worst logit error {worst[bits, weights]:.1e} of the largest", end="")
    assert min(worst[8, w] for w in ("int8", "int4")) > 1e-4
    assert all(worst[16, w] < worst[8, w] / 30 for w in ("int8", "int4"))


def test_inner_loops_keep_accumulators_in_registers():
    """The speed case on paper (loops.py): no decode kernel's or prompt tile's inner loop
    stores (GCC kept accumulator arrays in memory, a store each step), and the dot-product
    kernels spend fewer instructions per weight than the NEON ones they replace."""
    sys.path.insert(0, str(HERE))
    from loops import figures

    per64 = {}
    for name, body, weights in figures():
        stores = [f"{op} {args}" for _, op, args in body if op.startswith("st")]
        assert not stores, f"{name}: {stores}"
        per64[name] = len(body) * 64 / weights
    assert per64["gemv_int8_dotprod"] < per64["gemv_int8_i16"]
    assert per64["int4_rows_dotprod@G32"] < per64["int4_rows@G32"]
