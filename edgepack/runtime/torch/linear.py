"""Linear layers that compute from bitsandbytes' pre-quantized storage with plain torch.

The runtime swaps these in for ``nn.Linear`` / GPT-2's ``Conv1D`` on the meta device and
attaches the stored tensors as they are, so no full-precision copy of a quantized layer
ever exists. They read the exact tensors bitsandbytes writes:

* 8-bit: ``weight`` int8 [out, in] and ``SCB`` float32 [out], the absmax of each row, so
  ``W ~= weight * SCB / 127``. We multiply weight-only (activations stay in 16/32-bit):
  bitsandbytes' LLM.int8 also quantizes activations, which costs quality on CPU for no
  speed (measured: +1.2% perplexity vs ~0.0% weight-only).
* 4-bit: ``weight`` uint8 [out*in/2, 1], two 4-bit codes per byte, high nibble first;
  ``absmax`` per block of ``blocksize`` values (itself 8-bit quantized when double-quant is
  on: ``nested_absmax``, ``nested_quant_map`` and an ``offset``); ``quant_map`` the 16
  levels of nf4 or fp4. Dequantization below reproduces bitsandbytes' bit for bit (tested).
* 4-bit int4 (edgepack's CPU format, not bitsandbytes'): ``weight`` uint8 [out, in/2],
  column 2j in the low nibble and 2j+1 in the high one; ``weight.scales_and_zeros``
  [in/group, out, 2] in the compute dtype; ``W[n, k] = (q[n, k] - 8) * s[k // group, n, 0]
  + s[k // group, n, 1]``. That is the affine group-wise layout of torch's fused CPU kernel
  (``torch._weight_int4pack_mm_for_cpu``); the codes are repacked into the kernel's
  (ISA-specific) order once at load.

No bitsandbytes import here: on CPU a small box never pays for it (~120 MiB, ~1.5 s).
"""

from __future__ import annotations

import json

import torch
from torch import nn

# chunk sizes and the row counts where a prompt takes the wide paths: one home shared with
# the planner, which counts their memory (each is explained there)
from edgepack.runtime.constants import (
    DEQUANT_CHUNK_WEIGHTS,
    INT8_DIGIT_ROWS,
    INT8_TWO_DIGITS_MAX_IN,
    INT8_WIDE_CHUNK,
    INT8_WIDE_ROWS,
    WIDE_CHUNK_WEIGHTS,
    WIDE_ROWS,  # noqa: F401 (llama.py takes it from here)
)

QUANT_STATE_KEY = "quant_state.bitsandbytes__"  # + "nf4" / "fp4"
_wide_buffer = torch.empty(0)


def _wide_scratch(numel: int) -> torch.Tensor:
    global _wide_buffer
    if _wide_buffer.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            _wide_buffer = torch.empty(max(numel, WIDE_CHUNK_WEIGHTS), dtype=torch.float32)
    return _wide_buffer[:numel]


def float32_matmul(x: torch.Tensor, out_features: int, in_features: int, fill) -> torch.Tensor:
    """``x @ W.T`` for a 2-D ``x`` of many rows, in float32, W's rows written by
    ``fill(first_row, buffer)`` a chunk at a time into a buffer reused for the process; the
    result in ``x``'s dtype."""
    rows = max(16, WIDE_CHUNK_WEIGHTS // in_features)
    x32 = x.float()
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    for r in range(0, out_features, rows):
        n = min(rows, out_features - r)
        w = _wide_scratch(n * in_features).view(n, in_features)
        fill(r, w)
        out[:, r : r + n] = torch.mm(x32, w.t())
    return out


def wide_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a 16-bit ``weight``, through float32_matmul (weight rows
    converted to float32 a chunk at a time)."""
    return float32_matmul(x, weight.shape[0], weight.shape[1], lambda r, w: w.copy_(weight[r : r + w.shape[0]]))


INT8_DIGIT = 254.0  # an activation digit's range: -127..127


def int8_wide_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` for an int8 ``weight`` [out, in] and a 2-D ``x``
    of several rows, through torch's int8 GEMM with x as int8 digits (see INT8_WIDE_ROWS);
    the result in ``x``'s dtype. ``scales``: float32, one per weight row. Transients: the
    digits (1 byte each), float32 work on INT8_DIGIT_ROWS rows at a time, one chunk's
    int32 products and float32 result."""
    n, k = x.shape
    count = 2 if k <= INT8_TWO_DIGITS_MAX_IN else 3
    codes = torch.empty(count * n, k, dtype=torch.int8)
    s = torch.empty(n, 1)
    for b in range(0, n, INT8_DIGIT_ROWS):
        rest = x[b : b + INT8_DIGIT_ROWS].to(torch.float32, copy=True)
        rows = rest.shape[0]
        top = rest.abs().amax(1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny).div_(127.0)
        s[b : b + rows] = top
        rest.div_(top)  # in units of s: |rest| <= 127
        for d in range(count):
            digit = torch.round(rest)
            codes[d * n + b : d * n + b + rows] = digit
            if d + 1 < count:
                rest.sub_(digit).mul_(INT8_DIGIT)  # the remainder, |.| <= 1/2, scaled to [-127, 127]
    out = torch.empty(n, weight.shape[0], dtype=x.dtype)
    step = max(16, INT8_WIDE_CHUNK // (count * n))
    for r in range(0, weight.shape[0], step):
        acc = torch._int_mm(codes, weight[r : r + step].t())
        y = acc[:n].float()
        for d in range(1, count):
            y.add_(acc[d * n : (d + 1) * n], alpha=INT8_DIGIT**-d)
        out[:, r : r + step] = y.mul_(scales[r : r + step]).mul_(s)
    return out


class Int8Linear(nn.Module):
    """y = x @ (weight * SCB/127).T + bias, with int8 weights and one scale per row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device="meta"))
        self.register_buffer("SCB", torch.empty(out_features, dtype=torch.float32, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device="meta"), False) if bias else None
        self._scales: torch.Tensor | None = None
        self.scales32: torch.Tensor | None = None  # SCB / 127 in float32: the prompt path and edgepack.runtime.engine._engine

    def attach(self, tensors: dict[str, torch.Tensor]) -> None:
        self.weight = tensors["weight"]
        self.SCB = tensors["SCB"]
        if self.bias is not None:
            self.bias = nn.Parameter(tensors["bias"].to(self.compute_dtype), requires_grad=False)
        self.scales32 = self.SCB.float() / 127.0
        self._scales = self.scales32.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if x2.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2, self.weight, self._scales)
        else:  # plain torch elsewhere; the CUDA path uses bitsandbytes' own modules instead
            y = (x2 @ self.weight.to(x2.dtype).T) * self._scales
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(torch.float32) * (self.SCB[:, None] / 127.0)

    def cpu_kernel(self):
        """``x -> y`` for 2-D ``x`` already in the compute dtype, straight to torch's fused
        kernel (no reshape or cast per call); None where forward() must run instead."""
        if self.bias is not None or self.weight.device.type != "cpu":
            return None
        weight, scales, scales32, mm = self.weight, self._scales, self.scales32, torch._weight_int8pack_mm

        def run(x: torch.Tensor) -> torch.Tensor:
            return mm(x, weight, scales) if x.shape[0] < INT8_WIDE_ROWS else int8_wide_matmul(x, weight, scales32)

        return run

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def dequantize_absmax(tensors: dict[str, torch.Tensor], n_blocks: int) -> torch.Tensor:
    """float32 absmax per block, undoing double quantization when it was used."""
    absmax = tensors["absmax"]
    if "nested_absmax" not in tensors:
        return absmax.to(torch.float32)
    state = quant_state_info(tensors)
    nested_block = int(state["nested_blocksize"])
    codes = tensors["nested_quant_map"][absmax.long()]
    padded = torch.zeros(tensors["nested_absmax"].numel() * nested_block, dtype=torch.float32)
    padded[: codes.numel()] = codes
    scaled = padded.view(-1, nested_block) * tensors["nested_absmax"][:, None].to(torch.float32)
    return scaled.view(-1)[:n_blocks] + float(state["nested_offset"])


def quant_state_info(tensors: dict[str, torch.Tensor]) -> dict:
    """The small JSON bitsandbytes packs into a uint8 tensor beside each 4-bit weight."""
    key = next(k for k in tensors if k.startswith(QUANT_STATE_KEY))
    return json.loads(bytes(tensors[key].tolist()).decode("utf-8"))


def dequantize_4bit(
    packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: tuple[int, int]
) -> torch.Tensor:
    """float32 weights from packed 4-bit codes: high nibble is the first of each pair."""
    flat = packed.view(-1)
    idx = torch.stack((flat >> 4, flat & 0x0F), dim=-1).view(-1).long()
    numel = shape[0] * shape[1]
    if numel % blocksize == 0:
        return (code[idx].view(-1, blocksize) * absmax[:, None]).view(shape)
    # the last block is partial; the packed codes are padded to a whole byte
    values = code[idx[:numel]] * absmax.repeat_interleave(blocksize)[:numel]
    return values.view(shape)


INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4pack CPU kernel accepts
INT4_ROW_MULTIPLE = 16  # ... and it wants out_features in multiples of 16


def int4_fits(out_features: int, in_features: int, group: int) -> bool:
    """Whether torch's int4pack kernel can run a layer of this shape."""
    return out_features % INT4_ROW_MULTIPLE == 0 and in_features % group == 0


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 codes [out, in] from uint8 [out, in/2] (low nibble first)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


REPACK_ROWS = 256  # rows repacked at a time: the int32 codes the kernel's converter takes stay small
_chunked_repack_ok: bool | None = None


def repack_int4_for_cpu(packed: torch.Tensor) -> torch.Tensor:
    """The stored codes in the order of torch's CPU int4 kernel. Its converter wants int32
    codes (4 bytes a weight); converting a layer whole would leave that transient in the
    heap, so rows go REPACK_ROWS at a time where that gives the same bytes (checked once
    per process: the kernel's layout depends on the CPU)."""
    global _chunked_repack_ok
    convert = torch._convert_weight_to_int4pack_for_cpu
    if _chunked_repack_ok is None:
        probe = torch.randint(0, 256, (2 * REPACK_ROWS, 64), dtype=torch.uint8)
        whole = convert(unpack_int4(probe), 1)
        parts = [convert(unpack_int4(probe[i : i + REPACK_ROWS]), 1) for i in (0, REPACK_ROWS)]
        _chunked_repack_ok = torch.equal(torch.cat(parts), whole)
    if packed.shape[0] <= REPACK_ROWS or not _chunked_repack_ok:
        return convert(unpack_int4(packed), 1)
    return torch.cat([convert(unpack_int4(packed[i : i + REPACK_ROWS]), 1) for i in range(0, packed.shape[0], REPACK_ROWS)])


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """float32 [out, in] weights of an int4 layer."""
    codes = unpack_int4(packed).to(torch.float32)
    sz = scales_and_zeros.to(torch.float32).repeat_interleave(group, dim=0)  # [in, out, 2]
    return (codes - 8) * sz[..., 0].T + sz[..., 1].T


def int4_wide_matmul(x: torch.Tensor, codes: torch.Tensor, pairs: torch.Tensor, group: int) -> torch.Tensor:
    """``x @ W.T`` for an int4 layer in edgepack.runtime.engine._engine's layout (codes [out, in/2], pairs
    [out, in/group, 2] bfloat16), through float32_matmul: a chunk of rows at a time
    dequantized by edgepack.runtime.engine._engine."""
    from edgepack.runtime.engine import _engine as _native

    threads = torch.get_num_threads()

    def fill(r: int, w: torch.Tensor) -> None:
        _native.dequant_int4(codes[r].data_ptr(), pairs[r].data_ptr(), *w.shape, group, w.data_ptr(), threads)

    return float32_matmul(x, codes.shape[0], codes.shape[1] * 2, fill)


class Int4Linear(nn.Module):
    """edgepack's CPU 4-bit: affine codes in groups along the input, run by torch's fused
    int4 kernel (weight-only; activations in the compute dtype)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, group: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.group = compute_dtype, group
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device="meta"))
        self.register_buffer(
            "scales_and_zeros", torch.empty(in_features // group, out_features, 2, dtype=compute_dtype, device="meta")
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device="meta"), False) if bias else None
        self._kernel_weight: torch.Tensor | None = None  # the codes in the CPU kernel's order
        self._row_pairs: torch.Tensor | None = None  # (scale, zero) as [out, groups, 2]: edgepack.runtime.engine._engine's layout

    def attach(self, tensors: dict[str, torch.Tensor]) -> None:
        if not int4_fits(self.out_features, self.in_features, self.group) or self.group not in INT4_GROUP_SIZES:
            raise ValueError(f"a {self.out_features}x{self.in_features} layer in groups of {self.group} cannot run int4")
        self.weight = tensors["weight"]
        self.scales_and_zeros = tensors["weight.scales_and_zeros"].to(self.compute_dtype)
        if self.bias is not None:
            self.bias = nn.Parameter(tensors["bias"].to(self.compute_dtype), requires_grad=False)
        self._kernel_weight = self._row_pairs = None

    def prepare_cpu(self) -> None:
        """Repack the codes into the kernel's order and drop the stored ones (same size),
        once at load."""
        if self._kernel_weight is None and self._row_pairs is None:
            self._kernel_weight = repack_int4_for_cpu(self.weight)
            self.weight = torch.empty(self.weight.shape, dtype=torch.uint8, device="meta")

    def native_ready(self) -> bool:
        """Whether edgepack.runtime.engine._engine's int4 kernel can read this layer as stored."""
        return (
            self.weight.device.type == "cpu" and self.scales_and_zeros.dtype == torch.bfloat16
            and self.group % 32 == 0 and self._kernel_weight is None
        )

    def prepare_native(self) -> None:
        """Keep the stored codes (edgepack.runtime.engine._engine reads them: decode steps there, prompts
        through float32 GEMMs on weights it dequantizes) and the (scale, zero) pairs row by
        row; the stored pairs' order is dropped (a view of the new one stands in)."""
        if self._row_pairs is None:
            self._row_pairs = self.scales_and_zeros.transpose(0, 1).contiguous()
            self.scales_and_zeros = self._row_pairs.transpose(0, 1)

    def native_matrix(self) -> tuple:
        """(codes, pairs, group) for edgepack.runtime.engine._engine, after prepare_native."""
        return self.weight, self._row_pairs, self.group

    def cpu_kernel(self):
        """As Int8Linear.cpu_kernel: torch's int4 kernel (the codes repacked first if not
        done yet), or edgepack.runtime.engine._engine's dequantization and a float32 GEMM."""
        if self.bias is not None or self.weight.device.type not in ("cpu", "meta"):
            return None
        if self._row_pairs is not None:
            return lambda x: int4_wide_matmul(x, self.weight, self._row_pairs, self.group)
        self.prepare_cpu()
        weight, group, sz, mm = self._kernel_weight, self.group, self.scales_and_zeros, torch._weight_int4pack_mm_for_cpu
        return lambda x: mm(x, weight, group, sz)

    def dequantized_weight(self) -> torch.Tensor:
        if self._kernel_weight is None:
            return dequantize_int4(self.weight, self.scales_and_zeros, self.group)
        eye = torch.eye(self.in_features, dtype=torch.float32)  # read the weights back through the kernel
        return torch._weight_int4pack_mm_for_cpu(eye, self._kernel_weight, self.group, self.scales_and_zeros.float()).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if x2.device.type == "cpu" and self._row_pairs is not None:
            y = int4_wide_matmul(x2, self.weight, self._row_pairs, self.group)
        elif x2.device.type == "cpu":
            self.prepare_cpu()
            y = torch._weight_int4pack_mm_for_cpu(x2, self._kernel_weight, self.group, self.scales_and_zeros)
        else:  # plain torch elsewhere (the codes stay in the stored order off the CPU)
            y = x2 @ self.dequantized_weight().to(x2.dtype).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group}"


class Linear4bit(nn.Module):
    """nf4/fp4 weights dequantized block-wise on each call (memory-light, slower than int8)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, blocksize: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.blocksize = compute_dtype, blocksize
        self.register_buffer("weight", torch.empty((out_features * in_features + 1) // 2, 1, dtype=torch.uint8, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device="meta"), False) if bias else None
        self._code: torch.Tensor | None = None
        self._absmax: torch.Tensor | None = None

    def attach(self, tensors: dict[str, torch.Tensor]) -> None:
        self._stored = tensors  # as written by bitsandbytes; the CUDA path hands them back to it
        self.weight = tensors["weight"]
        self._code = tensors["weight.quant_map"].to(torch.float32)
        n_blocks = -(-self.out_features * self.in_features // self.blocksize)
        stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k.startswith("weight.")}
        self._absmax = dequantize_absmax(stats, n_blocks)
        if self.bias is not None:
            self.bias = nn.Parameter(tensors["bias"].to(self.compute_dtype), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        return dequantize_4bit(self.weight, self._code, self._absmax, self.blocksize, shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        rows = max(1, DEQUANT_CHUNK_WEIGHTS // self.in_features)
        if (rows * self.in_features) % self.blocksize or rows >= self.out_features:
            return nn.functional.linear(x, self.dequantized_weight().to(self.compute_dtype), self.bias)
        # Row chunks: the transient (int64 codes + float32 values, ~12 bytes a weight) stays
        # a few MiB instead of scaling with the layer, and so does what the heap keeps of it.
        out = torch.empty(*x.shape[:-1], self.out_features, dtype=self.compute_dtype)
        for start in range(0, self.out_features, rows):
            end = min(start + rows, self.out_features)
            packed = self.weight.view(-1)[start * self.in_features // 2 : end * self.in_features // 2]
            absmax = self._absmax[start * self.in_features // self.blocksize : end * self.in_features // self.blocksize]
            w = dequantize_4bit(packed, self._code, absmax, self.blocksize, (end - start, self.in_features))
            out[..., start:end] = nn.functional.linear(x, w.to(self.compute_dtype))
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit blocksize={self.blocksize}"
