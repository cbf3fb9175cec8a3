"""The reference model the exporter checks a written bundle against, built without holding
a full-precision copy of the model.

``dequantized_model``: transformers' own modeling code over the quantized tensors held in
memory, each quantized layer dequantized by **bitsandbytes** on every call (int4, which is
not bitsandbytes', by its formula written out in float32). It shares no code with the
runtime's kernels, so runtime logits matching it proves the kernels, the serialization and
the skeleton together. The streamed source model it is compared with is streamed.py's.
"""

from __future__ import annotations

import torch
from torch import nn

from edgepack.export.quantize import Result, Settings, bnb_functional
from edgepack.runtime.torch.model import dequantized_tables
from edgepack.export.streamed import assign, keep_tables_16bit, replace_module, skeleton

# pack.py reads the streamed source through this module's names
from edgepack.export.streamed import ShardReader, lazy_source_model  # noqa: F401


class DequantizedLinear(nn.Module):
    """y = x W^T + b with W dequantized by bitsandbytes from the stored tensors."""

    def __init__(self, stored: dict[str, torch.Tensor], settings: Settings):
        super().__init__()
        self.stored, self.settings = stored, settings

    def weight_float(self) -> torch.Tensor:
        if self.settings.bits == 8:
            return self.stored["weight"].float() * (self.stored["SCB"][:, None] / 127.0)
        if self.settings.method == "edgepack":  # int4, written out here apart from the runtime's kernel path
            packed, sz = self.stored["weight"], self.stored["weight.scales_and_zeros"].float()
            codes = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
            codes[:, 0::2], codes[:, 1::2] = (packed & 15).float(), (packed >> 4).float()
            group = self.settings.blocksize
            scale = sz[:, :, 0].T.repeat_interleave(group, dim=1)
            zero = sz[:, :, 1].T.repeat_interleave(group, dim=1)
            return (codes - 8) * scale + zero
        F = bnb_functional()
        stats = {k: v for k, v in self.stored.items() if k.startswith("weight.")}
        state = F.QuantState.from_dict(stats, device=torch.device("cpu"))
        return F.dequantize_4bit(self.stored["weight"], state).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.stored.get("bias")
        return nn.functional.linear(x.float(), self.weight_float(), None if bias is None else bias.float())


def dequantized_model(config, result: Result, settings: Settings) -> nn.Module:
    model = skeleton(config)
    for name in result.quantized_modules:
        prefix = name + "."
        stored = {k[len(prefix) :]: v for k, v in result.tensors.items() if k.startswith(prefix)}
        replace_module(model, name, DequantizedLinear(stored, settings))
    quantized = set(result.quantized_modules)
    tensors = dequantized_tables(result.tensors, result.tables)  # 8-bit tables as float32
    taken = keep_tables_16bit(model, tensors.get)
    for key, tensor in tensors.items():
        if not _owned_by(key, quantized) and key not in taken:
            assign(model, key, tensor.float() if tensor.is_floating_point() else tensor)
    return model


def _owned_by(key: str, modules: set[str]) -> bool:
    return any(key.startswith(m + ".") for m in modules)
