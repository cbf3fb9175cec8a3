"""Error-compensated rounding of 8-bit rows (GPTQ, Frantar et al. 2022) into bitsandbytes'
int8 format.

Round-to-nearest puts each weight on its row's int8 grid on its own. GPTQ rounds the input
columns one at a time and moves each rounding error onto the columns not rounded yet, in
proportion to how the layer's inputs correlate (the Hessian H = X^T X of the layer's
inputs over a calibration text), so the layer's *outputs* on such inputs change least.
The stored format does not change: int8 codes and one scale per row (``SCB``), which
bitsandbytes, transformers and edgepack's runtime read as before.

Two choices of ours:

* the row scale is fixed before rounding (absmax / 127, as bitsandbytes picks it) and
  rounded *up* to the nearest bfloat16 value: the CPU runtime multiplies by the scale in
  bf16, so a scale that bf16 holds exactly means every path (bf16 decode, float32 prompt,
  bitsandbytes on a GPU) computes with the same weights;
* the Hessians come from the float model, a decoder layer at a time (the calibration
  text's hidden states are kept between layers: 4096 tokens x hidden size floats), so
  only one layer's Hessians exist at once.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

BLOCK = 128  # columns whose errors are propagated lazily, as a matrix product
DAMP = 0.01  # of the mean diagonal, added to H: keeps the Cholesky factorisation stable
# Which module's input each quantized projection reads (q/k/v share one, gate/up another).
SITE_OF = {
    "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj",
}


def bf16_exact_scales(absmax: torch.Tensor) -> torch.Tensor:
    """Per-row scales >= absmax / 127 that bfloat16 represents exactly (zero rows get 1)."""
    wanted = absmax.float() / 127
    s = wanted.bfloat16()
    up = torch.nextafter(s, torch.full_like(s, float("inf")))
    s = torch.where(s.float() < wanted, up, s).float()
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_rows(weight: torch.Tensor, hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [out, in] and SCB [out] (= 127 x scale, as bitsandbytes stores it) for a
    float [out, in] weight; GPTQ with ``hessian`` [in, in], else round-to-nearest."""
    w = weight.to(torch.float32).clone()
    scale = bf16_exact_scales(w.abs().amax(1))
    if hessian is None:
        codes = (w / scale[:, None]).round_().clamp_(-127, 127)
        return codes.to(torch.int8), scale * 127
    if not torch.isfinite(hessian).all():
        raise ValueError("the calibration Hessian is not finite (activations overflowed)")
    # float32 (as the GPTQ reference does), and besides ``hessian`` at most two [in, in]
    # matrices alive at once: on an 11008-wide down_proj each is 0.5 GB
    diag = hessian.diagonal().to(torch.float32)
    dead = diag == 0  # inputs that were always zero: their weights do not matter
    w[:, dead] = 0
    # columns with the largest inputs first ("act order"): their errors have the most
    # columns left to be compensated on
    order = torch.argsort(diag, descending=True)
    w = w[:, order]
    h = hessian[order][:, order].to(torch.float32)
    h.diagonal().add_(torch.where(dead[order], 1.0, 0.0) + DAMP * diag.mean())
    # rows of the inverse's upper Cholesky factor drive the error propagation
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    hinv = torch.linalg.cholesky(h, upper=True)
    del h
    codes = torch.empty_like(w)
    inv_scale = 1 / scale
    columns = w.shape[1]
    for i1 in range(0, columns, BLOCK):
        i2 = min(i1 + BLOCK, columns)
        block, errors, hb = w[:, i1:i2].clone(), torch.empty(w.shape[0], i2 - i1), hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = block[:, j]
            q = (col * inv_scale).round_().clamp_(-127, 127)
            codes[:, i1 + j] = q
            err = (col - q * scale) / hb[j, j]
            block[:, j:].sub_(err[:, None] * hb[j, j:][None, :])
            errors[:, j] = err
        w[:, i2:].sub_(errors @ hinv[i1:i2, i2:])
    return codes[:, torch.argsort(order)].to(torch.int8), scale * 127


class LayerwiseCalibration:
    """Input Hessians of every quantized projection of a Llama-family decoder, one layer at
    a time and in order: ``hessian(layer, module)`` runs the float layers up to ``layer``
    on the calibration sequences (their hidden states are kept, nothing else)."""

    def __init__(self, model: nn.Module, sequences: list[list[int]]):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        # only the layers and the rotary tables are kept, not the model: a streamed source's
        # embedding table (as stored: 113 MiB on the default model from float32) goes with it
        self.layers, self.rotary = decoder.layers, decoder.rotary_emb
        self.positions = [torch.arange(len(ids))[None] for ids in sequences]
        with torch.inference_mode():
            embed = decoder.embed_tokens
            self.hidden = [embed(torch.tensor([ids])).to(torch.float32) for ids in sequences]
        self.layer = -1  # the layer whose Hessians are held; the hidden states are its outputs
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens = sum(len(ids) for ids in sequences)

    def describe(self) -> dict:
        return {
            "method": "GPTQ error-compensated rounding; row scales absmax/127 rounded up to bfloat16",
            "damp": DAMP,
            "calibration_tokens": self.tokens,
        }

    def hessian(self, layer: int, module: str) -> torch.Tensor | None:
        """float32 X^T X / tokens of ``module``'s input (``module`` as in SITE_OF), or None
        for a module GPTQ does not cover or a layer already passed."""
        if module not in SITE_OF or layer < self.layer:
            return None
        while self.layer < layer:
            self._advance()
        return self.hessians[SITE_OF[module]]

    @torch.inference_mode()
    def _advance(self) -> None:
        from edgepack.export.streamed import pinned

        i = self.layer + 1
        block = self.layers[i]
        self.hessians = {}  # the previous layer's go first
        sums: dict[str, torch.Tensor] = {}

        def hook(site: str) -> Callable:
            def record(_module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
                if site in sums:
                    sums[site].addmm_(x.T, x)
                else:
                    sums[site] = x.T @ x

            return record

        sites = sorted(set(SITE_OF.values()))
        handles = [block.get_submodule(s).register_forward_pre_hook(hook(s)) for s in sites]
        try:
            with pinned(block):  # a streamed source's weights read once for all sequences
                dtype = next(block.parameters()).dtype
                for n, (h, pos) in enumerate(zip(self.hidden, self.positions)):
                    x = h.to(dtype)
                    rotary = self.rotary(x, position_ids=pos)
                    out = block(x, attention_mask=None, position_ids=pos, position_embeddings=rotary)
                    out = out[0] if isinstance(out, tuple) else out
                    self.hidden[n] = out.to(torch.float32)
        finally:
            for handle in handles:
                handle.remove()
        self.hessians = {s: v.div_(self.tokens) for s, v in sums.items()}
        self.layer = i
