"""The base's linear weights also kept in oneDNN's packed layout, for CPU matrix products.

`F.linear` on a CPU hands oneDNN a plain weight at every call, in the layout the model stores, not
the one its kernels read best; a serving replica multiplies the same frozen weights thousands of
times a minute. Packing them once
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing does) and calling the
packed product serves more tokens per second, with bit-identical bf16 results on this project's CPU
(1.05-1.17x through HTTP, side by side: docs/benchmarks.md issue #12 (e8)).

The packed copies sit beside the plain weights (DoRA's norms, tied embeddings and private copies
still read those), so the base's linear weights take twice their memory: `packed_weights: false` on
a base turns this off. Every view of the base shares the base's weight tensors, so each view's
linear layers are pointed at the packs of the tensors they hold (`apply`); a layer whose weight is
not the base's (an adapter's own) keeps the plain product, as does any call that needs gradients or
runs on another device or dtype.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


def packable(dtype: torch.dtype) -> bool:
    """Whether this torch can pack linear weights of `dtype` for the CPU."""
    return (dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinears:
    """Packed copies of one model's CPU linear weights, by weight tensor."""

    def __init__(self, model: nn.Module) -> None:
        self.packs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (weight, packed)
        with torch.no_grad():
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if type(module) is nn.Linear and weight.device.type == "cpu" and id(weight) not in self.packs:
                    self.packs[id(weight)] = (weight, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        self.apply(model)

    def apply(self, model: nn.Module) -> nn.Module:
        """Point `model`'s linear layers that hold a packed weight at the packed product."""
        for module in model.modules():
            entry = self.packs.get(id(getattr(module, "weight", None)))
            if type(module) is nn.Linear and entry is not None and entry[0] is module.weight:
                module.forward = partial(_packed_forward, module, entry[1])
        return model


def _packed_forward(module: nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    if (x.dtype != weight.dtype or x.device.type != "cpu" or x.dim() < 2 or not x.numel()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return nn.functional.linear(x, weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")
