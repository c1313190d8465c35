"""The gathered LoRA forward: every plain LoRA adapter of a pool in one batched update per layer.

PEFT's mixed batches (`adapter_names`) loop over the distinct adapters of a batch in every LoRA
layer, so a batch of 16 rows with 16 adapters runs 16 small updates per layer and step. Here each
LoRA layer keeps the resident adapters' matrices stacked, A as [slots, r, in] and B transposed
(scaling folded in) as [slots, r, out], padded with zeros to the largest rank; slot 0 stays zero
(the bare base). Hot load writes an adapter into a free slot in place and unload zeroes its slot
for reuse; the stacks grow (doubling) only when every slot is taken or a larger rank arrives.

A forward takes the stacks of the distinct adapters its rows use (u of them) and computes:
- decode steps (one token per row): two dense products, x @ [A_1; ...; A_u]^T, masked so each row
  keeps only its own adapter's r columns, then @ [B_1; ...; B_u]. One call per product and layer
  whatever u; the masked-off columns are wasted work, but at one token per row and LoRA ranks that
  is far cheaper than gathering a copy of A and B per row for batched products (the BGMV
  formulation of Punica / S-LoRA, which this replaced: see docs/benchmarks.md issue #12);
- prefill (many tokens per row): per distinct adapter, its rows' tokens through A and B (the SGMV
  segments), so no token pays for another adapter's rank.
Zero padding adds exact zeros, so outputs equal PEFT's up to float summation order (tested at
atol 1e-5 on logits, greedy texts equal).

The rows of the current forward (`rows()`) are per thread: the replica prefills arrivals on a second
thread while its decoding thread runs decode steps on the same model (`prefill_worker.py`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn


class GatheredLora:
    """Stacked LoRA weights of one PeftModel's LoRA layers, and the per-row slot of the current forward."""

    def __init__(self, model) -> None:
        self.model = model
        self.slots: dict[str, int] = {}  # adapter key -> slot (0 is the bare base)
        self.free: list[int] = []
        self.capacity, self.rank = 1, 1
        self.A: dict[nn.Module, torch.Tensor] = {}
        self.B: dict[nn.Module, torch.Tensor] = {}  # transposed: [slots, r, out]
        self._forward = threading.local()  # the rows of the forward each thread runs (`rows()`)
        self.enabled = True  # False: mixed batches take PEFT's path (benchmarks compare the two)

    # ---- slots -------------------------------------------------------------------------------

    def gatherable(self, key: str) -> bool:
        """Plain LoRA on linear layers only: DoRA, LoRA biases, trained heads and other layer types
        keep PEFT's path."""
        from peft.tuners.lora.layer import Linear as LoraLinear

        config = self.model.peft_config.get(key)
        if config is None or getattr(config, "modules_to_save", None) or getattr(config, "fan_in_fan_out", False):
            return False
        found = False
        for module in self.model.modules():
            if key not in getattr(module, "lora_A", {}):
                continue
            if type(module) is not LoraLinear or module.use_dora.get(key) or module.lora_bias.get(key) \
                    or key in getattr(module, "lora_variant", {}):
                return False
            found = True
        return found

    def add(self, key: str) -> bool:
        """Copy an adapter already registered on the layers into a slot; False when it is not gatherable."""
        if not self.gatherable(key):
            return False
        layers = [m for m in self.model.modules() if key in getattr(m, "lora_A", {})]
        rank = max(m.lora_A[key].weight.shape[0] for m in layers)
        slot = self.free.pop() if self.free else len(self.slots) + 1
        self._reserve(slot + 1, max(rank, self.rank))
        with torch.no_grad():
            for layer in layers:
                self._patch(layer)
                a, b = layer.lora_A[key].weight, layer.lora_B[key].weight
                r = a.shape[0]
                self.A[layer][slot].zero_()
                self.B[layer][slot].zero_()
                self.A[layer][slot, :r] = a
                self.B[layer][slot, :r] = (b * layer.scaling[key]).T
        self.slots[key] = slot
        return True

    def remove(self, key: str) -> None:
        slot = self.slots.pop(key, None)
        if slot is None:
            return
        with torch.no_grad():
            for layer in self.A:
                self.A[layer][slot].zero_()
                self.B[layer][slot].zero_()
        self.free.append(slot)

    def _reserve(self, slots: int, rank: int) -> None:
        """Grow every stack to hold `slots` slots of rank `rank` (doubling the slot count)."""
        capacity = self.capacity
        while capacity < slots:
            capacity *= 2
        if capacity == self.capacity and rank <= self.rank:
            return
        for layer in list(self.A):
            self.A[layer], self.B[layer] = self._grown(self.A[layer], self.B[layer], capacity, rank)
        self.capacity, self.rank = capacity, max(rank, self.rank)

    @staticmethod
    def _grown(a: torch.Tensor, b: torch.Tensor, capacity: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        new_a = a.new_zeros(capacity, max(rank, a.shape[1]), a.shape[2])
        new_b = b.new_zeros(capacity, max(rank, b.shape[1]), b.shape[2])
        new_a[: a.shape[0], : a.shape[1]] = a
        new_b[: b.shape[0], : b.shape[1]] = b
        return new_a, new_b

    def _patch(self, layer: nn.Module) -> None:
        """Give the layer a stack and a forward that takes the gathered path while `index` is set."""
        if layer in self.A:
            return
        base = layer.base_layer
        self.A[layer] = base.weight.new_zeros(self.capacity, self.rank, base.in_features)
        self.B[layer] = base.weight.new_zeros(self.capacity, self.rank, base.out_features)
        peft_forward = layer.forward

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.index is None:
                return peft_forward(x, *args, **kwargs)
            kwargs.pop("adapter_names", None)
            return base(x, *args, **kwargs) + self.update(layer, x)

        layer.forward = forward

    # ---- the forward -------------------------------------------------------------------------

    @property
    def index(self) -> torch.Tensor | None:
        """Per-row slot while this thread runs a gathered forward (None: PEFT's path)."""
        return getattr(self._forward, "index", None)

    @property
    def used(self) -> torch.Tensor | None:
        """The distinct adapter slots of those rows (0 left out)."""
        return getattr(self._forward, "used", None)

    @property
    def mask(self) -> torch.Tensor | None:
        """[rows, 1, used, 1]: 1 where the row's slot is that one (None: every row runs one adapter)."""
        return getattr(self._forward, "mask", None)

    def update(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Each row's B[slot] A[slot] x, for x of [rows, tokens, in]."""
        used = self.used
        if used is None or not len(used):  # only bare-base rows
            return x.new_zeros(*x.shape[:-1], self.B[layer].shape[-1])
        stack_a, stack_b = self.A[layer], self.B[layer]
        rank = stack_a.shape[1]
        if len(used) == 1 or x.shape[1] == 1:
            a = stack_a.index_select(0, used).flatten(0, 1)  # [used * r, in]
            b = stack_b.index_select(0, used).flatten(0, 1)  # [used * r, out]
            h = x @ a.T
            if self.mask is not None:
                h = (h.unflatten(-1, (len(used), rank)) * self.mask.to(h.dtype)).flatten(-2)
            return h @ b
        out = x.new_zeros(*x.shape[:-1], stack_b.shape[-1])
        for slot in used.tolist():
            rows = (self.index == slot).nonzero().flatten()
            out[rows] = (x[rows] @ stack_a[slot].T) @ stack_b[slot]
        return out

    @contextlib.contextmanager
    def rows(self, keys: list[str | None]) -> Iterator[None]:
        """Run the model's LoRA layers gathered for these rows (None or an unknown key: the bare base)."""
        state = self._forward
        state.index = torch.tensor([self.slots.get(k, 0) if k else 0 for k in keys], dtype=torch.long)
        used = state.index.unique()
        state.used = used[used != 0]
        # Unneeded when every row runs the one adapter.
        state.mask = None if len(state.used) == 1 and len(used) == 1 else \
            (state.index[:, None] == state.used[None, :]).float()[:, None, :, None]
        try:
            yield
        finally:
            state.index = state.used = state.mask = None

    def covers(self, keys: list[str | None]) -> bool:
        return self.enabled and all(k is None or k in self.slots for k in keys)
