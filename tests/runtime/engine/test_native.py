"""edgepack.runtime.engine._engine: the C decode step. Its kernels against float64 math for every weight
type, instruction set and thread count; whole decode steps against a float64 Llama written
out here and against the torch path; fallbacks and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import edgepack
from edgepack.errors import BundleIntegrityError
from edgepack.runtime.torch import llama

native = pytest.importorskip("edgepack.runtime.engine._engine", reason="the C extension is not built here")

BEST_ISA = native.set_isa()


def _available_isas() -> list[str]:
    out = []
    for isa in ("generic", "avx2", "avx512"):
        try:
            native.set_isa(isa)
            out.append(isa)
        except ValueError:
            pass
    native.set_isa(BEST_ISA)
    return out


ISAS = _available_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv(llama.NATIVE_ENV, "1")  # the portable kernels too
    previous = native.set_isa(request.param)
    yield request.param
    native.set_isa(previous)


def _weights(kind: str, rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(stored weight, float32 row scales / int4 (scale, zero) pairs / None, the float64
    matrix they mean)"""
    if kind == "INT4":
        codes = torch.randint(0, 256, (rows, cols // 2), generator=gen, dtype=torch.uint8)
        pairs = (torch.randn(rows, cols // 32, 2, generator=gen) / 8).to(torch.bfloat16)
        q = torch.stack((codes & 15, codes >> 4), -1).reshape(rows, cols).double()
        sz = pairs.double().repeat_interleave(32, dim=1)  # [rows, cols, 2]
        return codes, pairs, (q - 8) * sz[..., 0] + sz[..., 1]
    if kind == "INT8":
        w = torch.randint(-127, 128, (rows, cols), generator=gen, dtype=torch.int8)
        scale = torch.rand(rows, generator=gen) / 64 + 1e-3
        return w, scale, w.double() * scale.double()[:, None]
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[kind]
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    return w, None, w.double()


SHAPES = [(1, 16), (7, 37), (64, 64), (33, 200), (130, 576)]
INT4_SHAPES = [(1, 32), (7, 64), (33, 576), (130, 1536)]  # 18 / 48 groups: over the 16 converted at once


@pytest.mark.parametrize("kind,rows,cols", [(k, r, c) for k in ("INT8", "BF16", "F16", "F32") for r, c in SHAPES]
                         + [("INT4", r, c) for r, c in INT4_SHAPES])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemv_matches_float64(isa, kind, rows, cols, threads):
    """Every weight type on every instruction set, shapes off the kernels' 4-row / 8- and
    16-column units (the tails), rows split over threads: y = W x (* scale) + bias."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    w, scale, exact = _weights(kind, rows, cols, gen)
    bias = torch.randn(rows, generator=gen)
    x = torch.randn(cols, generator=gen)
    y = torch.full((rows,), float("nan"))
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    matrix = (getattr(native, kind), rows, cols, w.data_ptr(), ptr(scale), bias.data_ptr()) + ((32,) if kind == "INT4" else ())
    native.gemv(matrix, x.data_ptr(), y.data_ptr(), threads)
    want = exact @ x.double() + bias.double()
    bound = 1e-5 * (exact.abs() @ x.double().abs() + bias.double().abs()) + 1e-6  # float32 accumulation
    assert torch.all((y.double() - want).abs() <= bound), (y, want)


def test_float16_subnormals_and_infinities_convert_exactly(isa):
    bits = torch.tensor([0x0001, 0x03FF, 0x0400, 0x7BFF, 0x8001, 0xFBFF, 0x3C00, 0x0000], dtype=torch.int32)
    w = bits.to(torch.int16).view(torch.float16).reshape(1, -1)  # one row of special values
    for i in range(w.shape[1]):
        x = torch.zeros(w.shape[1])
        x[i] = 1.0
        y = torch.empty(1)
        native.gemv((native.F16, 1, w.shape[1], w.contiguous().data_ptr(), None, None), x.data_ptr(), y.data_ptr(), 1)
        assert y.item() == w[0, i].float().item()


def test_int4_dequantization_is_the_stored_formula():
    gen = torch.Generator().manual_seed(7)
    codes, pairs, exact = _weights("INT4", 20, 96, gen)
    out = torch.empty(20, 96)
    native.dequant_int4(codes.data_ptr(), pairs.data_ptr(), 20, 96, 32, out.data_ptr(), 2)
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=1e-6)


def test_bad_matrix_is_refused():
    x, y = torch.zeros(4), torch.zeros(4)
    w = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="bad matrix"):  # int8 without its scales
        native.gemv((native.INT8, 4, 4, w.data_ptr(), None, None), x.data_ptr(), y.data_ptr(), 1)
    with pytest.raises(ValueError, match="bad matrix"):  # int4 groups must be multiples of 32
        native.gemv((native.INT4, 4, 64, w.data_ptr(), w.data_ptr(), None, 16), x.data_ptr(), y.data_ptr(), 1)
    with pytest.raises(ValueError, match="not available|instruction set"):
        native.set_isa("sse9")


@pytest.mark.parametrize("tensor", ["layers.1.mlp.down_proj.weight", "embed_tokens.weight"])
def test_a_bundle_with_a_minus_128_code_is_refused_at_load(bundle_copy, tensor):
    """The int8 products give w x's sign, and -128 has no negation in int8: a matrix holding
    one (int8 rows, or the 8-bit table that is also the output layer) is refused, past verify
    (which a changed byte fails first), in a sentence that names the code."""
    bundle = bundle_copy("llama", 8)
    manifest = json.loads((bundle / "edgepack.json").read_text())
    name = next(n for n in manifest["tensors"] if n.endswith(tensor))
    edgepack.load(bundle, verify=False)  # as packed: taken
    shard = bundle / manifest["tensors"][name]["file"]
    data = bytearray(shard.read_bytes())
    header_bytes = 8 + int.from_bytes(data[:8], "little")
    start = json.loads(data[8:header_bytes])[name]["data_offsets"][0]
    data[header_bytes + start + 5] = 0x80
    shard.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="int8 weight code of -128"):
        edgepack.load(bundle, verify=False)


# --- whole decode steps -----------------------------------------------------------------------


def _float64_logits(model: llama.LeanLM, ids: list[int]) -> torch.Tensor:
    """Logits at every position of ``ids``, a Llama forward in float64 from the model's own
    tensors (int8 rows times their scales), keys and values rounded to bfloat16 as the KV
    cache stores them."""
    cfg = model.cfg

    def w(module):
        if isinstance(module, edgepack.runtime.torch.linear.Int8Linear):
            return module.weight.double() * (module.SCB.double() / 127.0)[:, None]
        if isinstance(module, edgepack.runtime.torch.linear.Int4Linear):
            return module.dequantized_weight().double()
        return module.weight.double()

    def norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.eps) * weight.double()

    n, d, heads, kvh = len(ids), cfg.head_dim, cfg.heads, cfg.kv_heads
    pos = torch.arange(n, dtype=torch.float64)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.cat([torch.outer(pos, inv)] * 2, -1)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rope(t):
        return t * cos + torch.cat((-t[..., d // 2 :], t[..., : d // 2]), -1) * sin

    x = model.embed.double()[ids]
    for b in model.blocks:
        qkv = norm(x, b.input_norm) @ w(b.qkv_proj).T
        q = rope(qkv[:, : heads * d].view(n, heads, d))
        k = rope(qkv[:, heads * d : (heads + kvh) * d].view(n, kvh, d)).to(torch.bfloat16).double()
        v = qkv[:, (heads + kvh) * d :].view(n, kvh, d).to(torch.bfloat16).double()
        k, v = k.repeat_interleave(heads // kvh, 1), v.repeat_interleave(heads // kvh, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        att = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(n, heads * d)
        x = x + att @ w(b.o_proj).T
        gu = norm(x, b.post_norm) @ w(b.gate_up_proj).T
        x = x + (torch.nn.functional.silu(gu[:, : b.inter]) * gu[:, b.inter :]) @ w(b.down_proj).T
    return norm(x, model.norm) @ w(model.lm_head).T


@pytest.mark.parametrize("kind,bits", [("llama", 8), ("llama", 16), ("llama-untied", 8), ("llama-untied", 16), ("llama", 4)])
def test_decode_steps_match_float64_llama(packed, isa, kind, bits, monkeypatch):
    """Token by token from an empty cache: the C step's logits are float64's to float32
    rounding, closer than the torch path's (bfloat16 activations into its kernels)."""
    lm = edgepack.load(packed(kind, bits, **({"quant_type": "int4"} if bits == 4 else {})), backend="torch")
    model = lm.model
    assert model.native_off is None
    ids = lm.tokenizer.encode("Water boils at one hundred degrees")
    exact = _float64_logits(model, ids)
    ours, theirs = [], []
    native_cache, torch_cache = model.new_cache(32), model.new_cache(32)
    for t in ids:
        ours.append(model.native_step(t, native_cache))
        theirs.append(model._head(model._hidden(torch.tensor([[t]]), torch_cache)[-1:])[0].float())
    ours, theirs = torch.stack(ours).double(), torch.stack(theirs).double()
    scale = exact.abs().max()
    assert (ours - exact).abs().max() <= 1e-4 * scale
    assert (ours - exact).abs().max() < (theirs - exact).abs().max()
    assert native_cache.length == torch_cache.length == len(ids)
    # the same cache layout: what one path writes, the other reads
    assert (native_cache.k.float() - torch_cache.k.float()).abs().max() <= 0.05 * torch_cache.k.float().abs().max()


def test_decode_continues_a_prompt_run_by_torch(packed):
    """A prompt run by torch ops, then C steps on the same cache: the logits of a full
    recompute (the kernels read what torch wrote, at the right positions)."""
    lm = edgepack.load(packed("llama", 8), backend="torch")
    ids = lm.tokenizer.encode("The capital of France is Paris and")
    exact = _float64_logits(lm.model, ids)
    cache = lm.model.new_cache(64)
    lm.model.logits_last(torch.tensor([ids[:5]]), cache)
    steps = torch.stack([lm.model.logits_last(torch.tensor([[t]]), cache) for t in ids[5:]]).double()
    assert (steps - exact[5:]).abs().max() <= 2e-2 * exact.abs().max()  # the prompt's bf16 activations
    assert [int(s.argmax()) for s in steps] == [int(e.argmax()) for e in exact[5:]]


def test_threads_do_not_change_the_result(packed):
    lm = edgepack.load(packed("llama", 8), backend="torch")
    ids = lm.tokenizer.encode("Small boxes run small models")
    runs = []
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        try:
            cache = lm.model.new_cache(32)
            runs.append(torch.stack([lm.model.native_step(t, cache) for t in ids]))
        finally:
            torch.set_num_threads(2)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])  # rows split, sums not


def test_generate_uses_the_c_step_and_agrees_with_torch(packed, monkeypatch):
    bundle = packed("llama", 16)
    lm = edgepack.load(bundle, backend="torch")
    calls = []
    real = lm.model.native_step
    monkeypatch.setattr(lm.model, "native_step", lambda *a: calls.append(1) or real(*a))
    text = lm.generate("The capital", max_new_tokens=6, min_new_tokens=6, temperature=0)
    assert len(calls) == 5  # the prompt by torch, then one C step per further token
    monkeypatch.setenv(llama.NATIVE_ENV, "0")
    plain = edgepack.load(bundle, backend="torch")
    assert plain.model.native_off == f"{llama.NATIVE_ENV}=0"
    assert plain.generate("The capital", max_new_tokens=6, min_new_tokens=6, temperature=0) == text


def test_int4_prompt_path_and_torch_fallback_agree(packed, monkeypatch):
    """int4 layers kept for the C step run prompts through its dequantization and a float32
    GEMM; with the C step off they are repacked for torch's int4 kernel: same logits."""
    bundle = packed("llama", 4, quant_type="int4")
    ids = torch.tensor([edgepack.load(bundle, backend="torch").tokenizer.encode("The capital of France is Paris")])
    ours = edgepack.load(bundle, backend="torch").model
    assert ours.native_off is None and ours.blocks[0].qkv_proj._kernel_weight is None
    monkeypatch.setenv(llama.NATIVE_ENV, "0")
    plain = edgepack.load(bundle, backend="torch").model
    assert plain.blocks[0].qkv_proj._kernel_weight is not None and plain.blocks[0].qkv_proj._row_pairs is None
    a, b = ours(ids).logits.float(), plain(ids).logits.float()
    assert torch.allclose(a, b, atol=3e-2 * b.abs().max()) and torch.equal(a.argmax(-1), b.argmax(-1))


def test_layers_the_c_step_cannot_run_fall_back_to_torch(packed):
    lm = edgepack.load(packed("llama", 4, quant_type="nf4"), backend="torch")
    assert "Linear4bit" in lm.model.native_off
    cache = lm.model.new_cache(16)
    ids = lm.tokenizer.encode("The capital")
    lm.model.logits_last(torch.tensor([ids]), cache)
    assert lm.model.logits_last(torch.tensor([[ids[0]]]), cache).shape[-1] == lm.model.config["vocab_size"]


def test_portable_kernels_only_when_asked(packed, monkeypatch):
    previous = native.set_isa("generic")
    try:
        monkeypatch.delenv(llama.NATIVE_ENV, raising=False)
        assert "no AVX2 or AVX-512" in edgepack.load(packed("llama", 8), backend="torch").model.native_off
        monkeypatch.setenv(llama.NATIVE_ENV, "1")
        assert edgepack.load(packed("llama", 8), backend="torch").model.native_off is None
    finally:
        native.set_isa(previous)


def test_argmax_is_torchs():
    for values in (torch.randn(49152), torch.tensor([1.0, 3.0, 3.0, 2.0]), torch.tensor([5.0, float("nan"), 7.0]),
                   torch.full((3,), float("-inf")), torch.tensor([2.0])):
        assert llama.argmax(values) == int(torch.argmax(values))


def test_step_errors(packed):
    lm = edgepack.load(packed("llama", 8), backend="torch")
    cache = lm.model.new_cache(2)
    lm.model.native_step(3, cache)
    lm.model.native_step(4, cache)
    with pytest.raises(ValueError, match="KV cache holds 2 tokens"):
        lm.model.native_step(5, cache)
    with pytest.raises(ValueError, match="outside the model"):
        lm.model.native_step(10**6, lm.model.new_cache(2))


def test_a_forked_child_decodes(packed):
    """The thread pool does not survive fork(); the child starts its own (pthread_atfork)."""
    import multiprocessing

    lm = edgepack.load(packed("llama", 8), backend="torch")
    ids = lm.tokenizer.encode("The capital")
    cache = lm.model.new_cache(16)
    want = torch.stack([lm.model.native_step(t, cache) for t in ids])  # the pool is running now
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_steps_in_child, args=(lm.model, ids, send))  # fork: nothing pickled
    child.start()
    assert receive.poll(60), "the forked child did not answer"
    got = torch.tensor(receive.recv())
    child.join(10)
    assert child.exitcode == 0 and torch.equal(got, want)


def _steps_in_child(model, ids, send):
    cache = model.new_cache(16)
    send.send(torch.stack([model.native_step(t, cache) for t in ids]).tolist())  # plain floats: no shared memory


# --- edgepack's CPU engine (native.py): bundles run by the C module without torch ----------------


def _engine_and_reference(packed, kind: str, bits: int):
    """(native engine, torch lean decoder) of the same bundle."""
    # 16-bit tables: the reference holds them as stored (8-bit tables: test_tables.py)
    bundle = packed(kind, bits, table_bits=16, **({"quant_type": "int4"} if bits == 4 else {}))
    lm = edgepack.load(bundle)
    assert lm.backend == "native"
    return lm, edgepack.load(bundle, backend="torch").model


def _logits(view) -> torch.Tensor:
    return torch.frombuffer(view, dtype=torch.float32).double()


@pytest.mark.parametrize("kind,bits", [("llama", 8), ("llama", 16), ("llama-untied", 8), ("llama-untied", 16), ("llama", 4)])
def test_engine_matches_float64_llama(packed, isa, kind, bits):
    """Decode steps and prompts of every length (one chunk, several, a chunk after a prefix)
    give float64's logits to float32 rounding."""
    lm, ref = _engine_and_reference(packed, kind, bits)
    ids = (lm.tokenizer.encode("Water boils at one hundred degrees, and ice melts at zero. ") * 20)[:120]  # context 128
    exact = _float64_logits(ref, ids)
    scale = exact.abs().max()
    cache = lm.model.new_cache(120)
    steps = torch.stack([_logits(lm.model.forward([t], cache)) for t in ids[:20]])
    assert (steps - exact[:20]).abs().max() <= 1e-4 * scale
    for n in (2, 7, 64, 65, 120):  # prompts: shorter than a tile, one chunk, a chunk and one, two
        cache = lm.model.new_cache(120)
        got = _logits(lm.model.forward(ids[:n], cache))
        assert cache.length == n
        assert (got - exact[n - 1]).abs().max() <= 1e-4 * scale, n
    cache = lm.model.new_cache(120)  # a prompt, then another chunk after it, then steps
    lm.model.forward(ids[:70], cache)
    got = _logits(lm.model.forward(ids[70:110], cache))
    assert (got - exact[109]).abs().max() <= 1e-4 * scale
    tail = torch.stack([_logits(lm.model.forward([t], cache)) for t in ids[110:120]])
    assert (tail - exact[110:120]).abs().max() <= 1e-4 * scale


def test_engine_threads_do_not_change_the_result(packed):
    lm = edgepack.load(packed("llama", 8))
    ids = (lm.tokenizer.encode("Small boxes run small models, and they run them well.") * 10)[:100]
    runs = []
    for threads in (1, 2, 3):
        lm.model.threads = threads
        cache = lm.model.new_cache(len(ids) + 1)
        prompt = _logits(lm.model.forward(ids, cache))
        runs.append(torch.cat([prompt, _logits(lm.model.forward([5], cache))]))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])  # rows and heads split, sums not


def test_engine_greedy_generation_agrees_with_the_torch_backend(packed):
    bundle = packed("llama", 16)
    ours = edgepack.load(bundle).generate("The capital", max_new_tokens=6, min_new_tokens=6, temperature=0)
    theirs = edgepack.load(bundle, backend="torch").generate("The capital", max_new_tokens=6, min_new_tokens=6, temperature=0)
    assert ours == theirs


def test_engine_reads_no_tensor_twice_and_holds_only_the_weights(packed):
    """The arena is the bundle's tensors as stored (norms as float32), nothing else: a 16-bit
    copy of an int8 layer would show here."""
    bundle = packed("llama", 8)
    lm = edgepack.load(bundle)
    stored = sum(e["size"] for e in lm.manifest["files"] if e["path"].endswith(".safetensors"))
    norms = sum(1 for k in lm.manifest["tensors"] if "norm" in k) * 64 * 2  # bf16 -> float32: 2 more bytes each
    assert stored - 4096 <= lm.model.weight_bytes <= stored + norms + 64 * len(lm.manifest["tensors"])


def test_engine_backend_choice_and_fallbacks(packed, monkeypatch):
    from edgepack.errors import GenerationError

    nf4 = packed("llama", 4, quant_type="nf4")
    assert edgepack.load(nf4).backend == "torch"  # nf4 layers: the torch backend
    with pytest.raises(GenerationError, match="cannot run this bundle: nf4 layers"):
        edgepack.load(nf4, backend="native")
    with pytest.raises(GenerationError, match="unknown backend"):
        edgepack.load(nf4, backend="cuda")
    assert edgepack.load(packed("gpt2", 8)).backend == "torch"  # not a Llama-family model
    monkeypatch.setenv(llama.NATIVE_ENV, "0")
    assert edgepack.load(packed("llama", 8)).backend == "torch"
    monkeypatch.delenv(llama.NATIVE_ENV)
    previous = native.set_isa("generic")
    try:
        assert edgepack.load(packed("llama", 8)).backend == "torch"  # untuned portable kernels: off
        monkeypatch.setenv(llama.NATIVE_ENV, "1")
        assert edgepack.load(packed("llama", 8)).backend == "native"
    finally:
        native.set_isa(previous)


def test_engine_errors(packed):
    lm = edgepack.load(packed("llama", 8))
    cache = lm.model.new_cache(3)
    lm.model.forward([3, 4], cache)
    with pytest.raises(ValueError, match="KV cache holds 3 tokens; 4 were asked for"):
        lm.model.forward([5, 6], cache)
    assert cache.length == 2  # nothing written
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.model.forward([10**6], lm.model.new_cache(2))
    with pytest.raises(TypeError):
        lm.model.forward(["a"], lm.model.new_cache(2))


def test_engine_in_a_forked_child(packed):
    import multiprocessing

    lm = edgepack.load(packed("llama", 8))
    ids = lm.tokenizer.encode("The capital")
    want = lm.generate("The capital", max_new_tokens=5, min_new_tokens=5, temperature=0)  # the pool is running
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=lambda: send.send(lm.generate("The capital", max_new_tokens=5, min_new_tokens=5, temperature=0)))
    child.start()
    assert receive.poll(60), "the forked child did not answer"
    got = receive.recv()
    child.join(10)
    assert child.exitcode == 0 and got == want and ids


def _draws(logits: list[float], n: int = 2000, **kw) -> dict[int, int]:
    from array import array

    values = array("f", logits)
    counts: dict[int, int] = {}
    for i in range(n):
        t = native.sample(native.address(values), len(values), kw.get("temperature", 1.0), kw.get("top_k", 0),
                          kw.get("top_p", 1.0), (i + 0.5) / n)
        counts[t] = counts.get(t, 0) + 1
    return counts


def test_sampling_follows_temperature_top_k_and_top_p():
    logits = [math.log(p) for p in (0.1, 0.4, 0.2, 0.3)]
    counts = _draws(logits)  # u spread evenly over [0, 1): the draws are the probabilities
    assert {t: round(c / 2000, 2) for t, c in counts.items()} == {0: 0.1, 1: 0.4, 2: 0.2, 3: 0.3}
    assert set(_draws(logits, top_k=2)) == {1, 3}
    assert abs(_draws(logits, top_k=2)[1] / 2000 - 0.4 / 0.7) < 0.01
    assert set(_draws(logits, top_p=0.5)) == {1, 3}  # 0.4 < 0.5: the next one (0.3) is kept too
    assert set(_draws(logits, top_p=0.35)) == {1}
    assert set(_draws(logits, temperature=0.01)) == {1}
    assert set(_draws([0.0, float("-inf"), 1.0])) == {0, 2}
    with pytest.raises(ValueError, match="no token has a finite logit"):
        _draws([float("-inf")] * 3, n=1)
    seeded = [edgepack_sample(s) for s in (1, 1, 2)]
    assert seeded[0] == seeded[1]


def edgepack_sample(seed: int) -> list[int]:
    import random

    from edgepack.runtime.engine import NativeLM

    rng = random.Random(seed)
    from array import array

    logits = memoryview(array("f", [0.0] * 50)).cast("B").cast("f")
    return [NativeLM.sample(None, logits, 1.0, 0.9, 0, rng) for _ in range(20)]


def test_convert_rounds_as_torch():
    from array import array

    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-9, 4, (4000,), generator=gen),
                        torch.tensor([0.0, -0.0, 60000.0, 6e-8, 1e-8])])
    bf16 = values.to(torch.bfloat16)
    out = torch.empty(len(values), dtype=torch.float16)
    assert native.convert(bf16.data_ptr(), native.BF16, out.data_ptr(), native.F16, len(values))
    assert torch.equal(out.view(torch.int16), bf16.float().to(torch.float16).view(torch.int16))
    f32 = values.float()
    half = torch.empty(len(values), dtype=torch.float16)
    assert native.convert(f32.data_ptr(), native.F32, half.data_ptr(), native.F16, len(values))
    assert torch.equal(half.view(torch.int16), f32.to(torch.float16).view(torch.int16))
    scb = torch.rand(100, generator=gen) * 3
    scaled = scb.clone()
    native.convert(scaled.data_ptr(), native.F32, scaled.data_ptr(), native.F32, 100, 127.0)
    assert torch.equal(scaled, scb / 127.0)  # Int8Linear.scales32 exactly
    big = torch.tensor([1.0, 70000.0]).to(torch.bfloat16)
    keep = big.clone()
    assert not native.convert(big.data_ptr(), native.BF16, big.data_ptr(), native.F16, 2)
    assert torch.equal(big, keep)  # nothing written
    assert native.address(bytes(8)) != 0 and array("f", [1.0])


def test_engine_adaptive_thread_count_does_not_change_the_result(packed, monkeypatch):
    """Unless a count is asked for, each step runs on the count measured fastest (probing
    others now and then): the logits are those of one thread, step after step."""
    monkeypatch.delenv("EDGEPACK_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    lm = edgepack.load(packed("llama", 8))
    assert lm.model.adapt
    lm.model._threads = 3  # at most 3, whatever this box has
    ids = lm.tokenizer.encode("Small boxes run small models")
    runs = []
    for adaptive in (True, False):
        if not adaptive:
            lm.model.threads = 1
        cache = lm.model.new_cache(len(ids) + 60)
        logits = [_logits(lm.model.forward(ids, cache))]
        logits += [_logits(lm.model.forward([5 + i], cache)) for i in range(60)]  # probes at steps 3, 27, 51
        runs.append(torch.stack(logits))
        assert 1 <= lm.model.threads_in_use() <= 3
    assert not lm.model.adapt and torch.equal(runs[0], runs[1])


def _probes(trace: list[int], current: int) -> int:
    return sum(1 for n in trace if n != current)


def test_the_step_picker_probes_less_where_probes_lose():
    """The thread-count picker (pool.c) on steps of given times: a quiet box where one thread is
    1.8x slower stops paying a probe every 24 steps; a load that slows the count in use brings
    the probes back and moves to the count now faster; near ties keep being probed."""
    quiet = [[1.8, 1.0]] * 960
    trace = native.adapt_trace(2, quiet)
    assert trace[:3] == [2, 2, 1]  # the first probe at step 3
    assert set(trace[3:]) <= {1, 2} and trace[-1] == 2
    assert 4 <= _probes(trace, 2) <= 10  # 40 at one every 24 steps
    busy = [[1.0, 1.9]] * 200  # another program on one core: two threads now lose
    trace = native.adapt_trace(2, quiet + busy)
    assert trace[960 + 30 :].count(1) >= 160  # one thread within a turn, two probed at most every 24 steps
    close = [[1.02, 1.0]] * 480  # a near tie: fewer threads win (MARGIN) and both stay probed
    assert _probes(native.adapt_trace(2, close), 1) >= 15


def test_run_threads_flag_and_stats_name_the_engine(capsys, packed, monkeypatch):
    from edgepack.cli import main

    monkeypatch.setenv("EDGEPACK_THREADS", "")  # restored after the test (--threads sets it)
    bundle = str(packed("llama", 8))
    args = ["run", bundle, "The capital", "--max-new-tokens", "3", "--temperature", "0", "--stats"]
    assert main(args + ["--threads", "2"]) == 0
    assert f"engine {native.set_isa()}, 2 threads, float activations)" in capsys.readouterr().err
    assert main(args + ["--threads", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --threads must be at least 1, not 0") and "hint: " in err


def test_a_wrapped_sliding_window_ring_keeps_all_or_nothing():
    """Position p of a ring of 8 lives in slot p % 8: after 10 positions, slots 0-1 hold
    positions 8-9, so cutting back to 5 would attend to the wrong keys; before it wraps, any
    prefix is still there."""
    from edgepack.runtime import engine

    cache = engine.NativeCache(layers=2, kv_heads=1, head_dim=4, max_tokens=32, sliding=1, window=8)
    cache.length = 6
    assert cache.keep(3) == 3 and cache.length == 3
    cache.length = 10
    assert cache.keep(10) == 10
    assert cache.keep(5) == 0 and cache.length == 0
    cache.length = 10
    with pytest.raises(ValueError, match="wrapped"):
        cache.truncate(5)
    with pytest.raises(ValueError, match="rings"):
        engine.NativeCache(layers=2, kv_heads=1, head_dim=4, max_tokens=32).copy_prefix(cache, 4)
    plain = engine.NativeCache(layers=2, kv_heads=1, head_dim=4, max_tokens=32)
    plain.length = 20
    assert plain.keep(5) == 5
