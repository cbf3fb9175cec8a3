"""The runtime's numbers that the planner and the preflight check also count with: one
home, read by both (the planner must not import the runtime's torch code paths to learn
them). Standard library only; nothing here is computed.

tests/runtime/test_constants.py checks the C engine's exported sizes equal these.
"""

MIB = 1 << 20

# --- preflight: what a process needs beyond the weights, per backend --------------------------
# torch backend: interpreter + torch + transformers (~350 MiB measured on x86-64 CPU), the KV
# cache and activations of a short run.
TORCH_OVERHEAD_BYTES = 400 * MIB
# native backend (no torch): interpreter, tokenizers and the C module (~30 MiB measured), a
# large tokenizer (~15 MiB), the KV cache and prompt scratch of a short run.
NATIVE_OVERHEAD_BYTES = 96 * MIB

# --- the C engine's prompt pass (csrc/engine.h: CHUNK, PB; exported as PROMPT_CHUNK, PROMPT_ROWS)
PROMPT_CHUNK = 96  # prompt tokens per pass through the layers (two AVX-512 tiles of 48)
PROMPT_ROWS = 16  # weight rows converted to float32 at a time in a prompt's GEMM

# --- the torch backend's quantized linear layers (runtime/torch/linear.py) --------------------
# 4-bit layers are dequantized at most this many weights at a time.
DEQUANT_CHUNK_WEIGHTS = 1 << 18
# From this many rows (a prompt, not a decode step) a 16-bit layer multiplies in float32 with
# its weights converted on the fly: oneDNN's fp32 GEMM beats its bf16 GEMM there (2-core
# AVX-512 box: [256, 576] x [576, 6144] 6.4 ms fp32, 10.7 ms bf16). Int8 layers take their
# own path from INT8_WIDE_ROWS (below).
WIDE_ROWS = 32
# ... converting this many weights at a time into one float32 buffer kept for the process
# (4 MiB): no per-call allocation of a layer's float32 copy for the heap to hold on to.
WIDE_CHUNK_WEIGHTS = 1 << 20
# From this many rows an int8 layer multiplies int8 x int8 -> int32 (torch._int_mm: oneDNN's
# VNNI GEMM, ~4x the float32 GEMM's rate here) with each activation row written as int8
# digits: x ~= s * (q1 + q2 / 254 [+ q3 / 254**2]), s = the row's absmax / 127. This is
# weight-only int8 math, not activation quantization (one digit, W8A8 style, measured mean
# KL 0.0083 against 0.0016 on SmolLM2). Two digits round each value to a step of max/32258;
# a row's max being at most sqrt(in) times its rms, the rounding error over a row is then no
# larger than bf16 rounding's (what the decode kernel's inputs get) up to
# INT8_TWO_DIGITS_MAX_IN inputs; wider layers get a third digit. 2-core AVX-512 box, one
# SmolLM2 layer's int8 matmuls: 256 rows 11.6 -> 7.0 ms against float32 GEMM on converted
# weights, 8 rows 0.77 -> 0.63 ms against int8pack; under 8 rows int8pack is faster.
INT8_WIDE_ROWS = 8
# ... a chunk of weight rows at a time, so the int32 products stay this many values.
INT8_WIDE_CHUNK = 1 << 19
INT8_DIGIT_ROWS = 64  # activation rows turned into digits at a time
INT8_TWO_DIGITS_MAX_IN = 126**2  # sqrt(in) / (32258 * sqrt(12)) <= 2**-9 / sqrt(3)
