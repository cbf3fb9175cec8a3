"""The source checkpoint, read from its safetensors shards a tensor at a time.

* ``skeleton``: the source architecture on the meta device, no weight allocated.
* ``lazy_source_model``: the source model with every linear weight read from its shard just
  before the layer runs and dropped after it, so the quality of a 7B bundle against its
  source is measured in the memory of one layer; ``pinned`` keeps a layer's weights read
  for many passes (GPTQ's calibration runs every sequence through one layer).
* ``ShardReader``: random access to a checkpoint's tensors (one file or an index).

The embedding table and a 16-bit output layer stay as stored and are upcast per call
(``UpcastEmbedding``, ``UpcastLinear``), here and in reference.py's dequantized model.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def skeleton(config) -> nn.Module:
    """The source architecture on the meta device; buffers (rotary tables) stay real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # so a tied output layer is the embedding's very parameter
    return model.eval()


class UpcastEmbedding(nn.Module):
    """An embedding table kept as stored (16-bit); looked-up rows come out in float32, times
    ``scale`` (transformers' ScaledWordEmbedding: Gemma's sqrt(hidden_size), 8 at 64 wide)."""

    def __init__(self, weight: torch.Tensor, scale: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.weight).float()
        return rows if self.scale is None else rows * self.scale


def _embedding_scale(module: nn.Module) -> tuple[bool, float | None]:
    """(whether UpcastEmbedding computes what ``module`` does, the scale it needs). A plain
    nn.Embedding needs none; transformers' ``*ScaledWordEmbedding`` classes (Gemma 1-3, BioGPT,
    XGLM, ...) return ``super().forward(ids) * self.embed_scale``; any other override of
    forward is left alone (its table is then upcast whole)."""
    forward = type(module).forward
    if forward is nn.Embedding.forward:
        return True, None
    scale = getattr(module, "embed_scale", None)
    if type(module).__name__.endswith("ScaledWordEmbedding") and isinstance(module, nn.Embedding):
        if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.device.type != "meta":
            return True, float(scale)
        if isinstance(scale, (int, float)):
            return True, float(scale)
    return False, None


class UpcastLinear(nn.Module):
    """A 16-bit output layer computed in float32, a block of rows at a time: the float32
    copy of a whole vocabulary (768 MiB on a 1B model, GiBs at 128k tokens) never exists."""

    ROWS = 8192

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        parts = [x @ self.weight[i : i + self.ROWS].float().T for i in range(0, self.weight.shape[0], self.ROWS)]
        out = torch.cat(parts, dim=-1)
        return out if self.bias is None else out + self.bias.float()


def keep_tables_16bit(
    model: nn.Module, tensor_of: Callable[[str], torch.Tensor | None], untied_output: bool = True
) -> set[str]:
    """Swap the input embedding and a 16-bit output layer (a tied one always, an untied one
    if ``untied_output``) for modules that upcast per call; return the keys they took.
    ``tensor_of(key)``: the stored tensor, or None."""
    taken: set[str] = set()
    names = {id(m): n for n, m in model.named_modules()}
    embed_module = model.get_input_embeddings()
    embed_name = names[id(embed_module)]
    embed = tensor_of(f"{embed_name}.weight")
    same, scale = _embedding_scale(embed_module)
    if embed is not None and embed.is_floating_point() and same:
        replace_module(model, embed_name, UpcastEmbedding(embed, scale))
        taken.add(f"{embed_name}.weight")
    output = model.get_output_embeddings()
    if output is not None and isinstance(output, nn.Linear):
        out_name = names[id(output)]
        tied = getattr(model.config, "tie_word_embeddings", False)
        weight = tensor_of(f"{out_name}.weight") if untied_output and not tied else None
        if tied and embed is not None:
            weight = embed  # the same stored table
        if weight is not None and weight.is_floating_point():
            bias = tensor_of(f"{out_name}.bias") if output.bias is not None else None
            replace_module(model, out_name, UpcastLinear(weight, bias))
            taken |= {f"{out_name}.weight", f"{out_name}.bias"}
    return taken


def lazy_source_model(config, read: Callable[[str], torch.Tensor], linear_names: set[str], keys: list[str]) -> nn.Module:
    """The source model with linear weights read on demand; everything else read once
    (the embedding table as stored, upcast per lookup)."""
    model = skeleton(config)
    known = set(keys)
    # an untied output layer stays lazy (read per call, like the other linears)
    taken = keep_tables_16bit(model, lambda key: read(key) if key in known else None, untied_output=False)
    linear_names = linear_names - {k.rsplit(".", 1)[0] for k in taken}
    for key in keys:
        owner, _, attr = key.rpartition(".")
        if (owner in linear_names and attr == "weight") or key in taken:
            continue
        assign(model, key, read(key).float())
    for name in linear_names:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(_load_weight(read, f"{name}.weight"))
        module.register_forward_hook(_drop_weight)
        module.edgepack_lazy = True
    return model


def _load_weight(read: Callable[[str], torch.Tensor], key: str):
    def hook(module, _args):
        if module.weight.device.type == "meta":  # else pinned and already read
            module.weight = nn.Parameter(read(key).float(), requires_grad=False)

    return hook


def _drop_weight(module, _args=None, _output=None):
    if not getattr(module, "edgepack_pinned", False):
        module.weight = nn.Parameter(torch.empty(module.weight.shape, device="meta"), requires_grad=False)


@contextmanager
def pinned(module: nn.Module):
    """Inside, the lazy linear weights under ``module`` are read once and kept, not read
    again on every call (for many forward passes through one decoder layer)."""
    lazy = [m for m in module.modules() if getattr(m, "edgepack_lazy", False)]
    for m in lazy:
        m.edgepack_pinned = True
    try:
        yield
    finally:
        for m in lazy:
            m.edgepack_pinned = False
            _drop_weight(m)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, _, attr = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


class ShardReader:
    """Random access to tensors of a safetensors checkpoint (one file or an index)."""

    def __init__(self, folder: Path):
        import json

        from edgepack.format.bundle import read_safetensors_header

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: folder / f for k, f in weight_map.items()}
        else:
            self.files = {}
            for shard in sorted(folder.glob("*.safetensors")):
                self.files.update({k: shard for k in read_safetensors_header(shard, max_header_bytes=100_000_000)})

    def __call__(self, key: str) -> torch.Tensor:
        from edgepack.runtime.torch.model import read_shard

        path = self.files[key]
        for _name, tensor in read_shard(path, rel=path.name, only={key}):
            return tensor
        raise KeyError(key)

    def by_file(self) -> dict[Path, list[str]]:
        groups: dict[Path, list[str]] = {}
        for key, path in self.files.items():
            groups.setdefault(path, []).append(key)
        return groups
