"""A running batch's KV cache in buffers with room to grow, so the cache is not copied at every step.

transformers' `DynamicLayer` concatenates each step's keys and values onto the cache, a copy of every
row's whole cache per layer and step; and a continuous batch changes its rows between steps, which
with plain tensors meant copying the whole cache again whenever a row left (index) or joined (cat).
Here each layer keeps buffers of [rows, KV heads, columns, head dim] with spare rows and columns:
- a decode step writes its one new column in place (`update`);
- a finished row's place is taken by one of the last rows (`keep`): only the moved rows are copied,
  and the batch's row order changes accordingly (the caller reorders its rows the same way);
- joining rows are written into spare rows, right-aligned with the others (`append`);
- columns that became padding for every row are dropped by moving the left edge (`trim`).
Rows 0..n-1 and columns lo..hi-1 are the batch; `keys` / `values` are views of that region, which is
what attention reads (left-padded, as the batch's attention mask says). The buffers are reallocated,
with room doubled, only when rows or columns run out.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

ROOM = 64  # spare columns a new buffer gets at least (about this many decode steps before it grows)


class SlotLayer(DynamicLayer):
    """One layer's keys and values for the batch's rows, inside larger buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.n, self.lo, self.hi = 0, 0, 0
        self.buf_k = self.buf_v = keys.new_zeros(0, keys.shape[1], 0, keys.shape[3])
        self._views()
        self.append(keys, values)

    def _views(self) -> None:
        self.keys = self.buf_k[: self.n, :, self.lo: self.hi]
        self.values = self.buf_v[: self.n, :, self.lo: self.hi]

    def _resize(self, rows: int, left: int, right: int) -> None:
        """New buffers with `rows` rows and `left` / `right` spare columns around the batch's (a copy)."""
        width = self.hi - self.lo
        shape = (rows, self.buf_k.shape[1], left + width + right, self.buf_k.shape[3])
        new_k, new_v = self.buf_k.new_zeros(shape), self.buf_v.new_zeros(shape)
        new_k[: self.n, :, left: left + width] = self.keys
        new_v[: self.n, :, left: left + width] = self.values
        self.buf_k, self.buf_v, self.lo, self.hi = new_k, new_v, left, left + width
        self._views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Every row's next positions (a decode step's one column) written in place."""
        count = key_states.shape[-2]
        if self.hi + count > self.buf_k.shape[2]:
            self._resize(self.buf_k.shape[0], min(self.lo, ROOM // 4), max(ROOM, self.hi - self.lo) + count)
        self.buf_k[: self.n, :, self.hi: self.hi + count] = key_states
        self.buf_v[: self.n, :, self.hi: self.hi + count] = value_states
        self.hi += count
        self._views()
        return self.keys, self.values

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows joining the batch (their own left-padded cache), right-aligned with the batch's rows."""
        rows, width = keys.shape[0], keys.shape[2]
        grow_left = max(0, width - (self.hi - self.lo))
        if self.n + rows > self.buf_k.shape[0] or grow_left > self.lo:
            spare_rows = max(self.n + rows, 2 * self.buf_k.shape[0])
            self._resize(spare_rows, grow_left + ROOM // 4, max(ROOM, self.buf_k.shape[2] - self.hi))
        if grow_left:  # older rows: padding in the new columns (masked; zeroed so no stale value is read)
            self.buf_k[: self.n, :, self.lo - grow_left: self.lo] = 0
            self.buf_v[: self.n, :, self.lo - grow_left: self.lo] = 0
            self.lo -= grow_left
        new = slice(self.n, self.n + rows)
        pad = self.hi - self.lo - width
        self.buf_k[new, :, self.lo: self.lo + pad] = 0
        self.buf_v[new, :, self.lo: self.lo + pad] = 0
        self.buf_k[new, :, self.hi - width: self.hi] = keys
        self.buf_v[new, :, self.hi - width: self.hi] = values
        self.n += rows
        self._views()

    def move(self, to: torch.Tensor, source: torch.Tensor, rows: int) -> None:
        """Rows `source` copied onto rows `to`; the batch keeps its first `rows` rows."""
        if len(to):
            self.buf_k[to, :, self.lo: self.hi] = self.buf_k[source, :, self.lo: self.hi]
            self.buf_v[to, :, self.lo: self.hi] = self.buf_v[source, :, self.lo: self.hi]
        self.n = rows
        self._views()

    def trim(self, columns: int) -> None:
        self.lo += columns
        self._views()


class SlotCache(DynamicCache):
    """The running batch's cache: one `SlotLayer` per model layer, changed row-wise by the batch."""

    def __init__(self, layers) -> None:
        super().__init__()
        self.layer_class_to_replicate = None
        self.layers = [SlotLayer(layer.keys, layer.values) for layer in layers]

    def append(self, layers) -> None:
        """The rows of another cache (a prefill's) join, after the batch's rows."""
        for mine, theirs in zip(self.layers, layers):
            mine.append(theirs.keys, theirs.values)

    def keep(self, rows: list[int]) -> list[int]:
        """Keep these rows (ascending indices); returns the new row order: position p holds old row
        order[p]. Rows kept beyond the new count fill the places of the rows that left."""
        count, kept = len(rows), set(rows)
        holes = [i for i in range(count) if i not in kept]
        movers = [i for i in rows if i >= count]
        order = list(range(count))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        to, source = torch.tensor(holes, dtype=torch.long), torch.tensor(movers, dtype=torch.long)
        for layer in self.layers:
            layer.move(to, source, count)
        return order

    def trim(self, columns: int) -> None:
        """Drop the first `columns` columns (padding for every row)."""
        if columns:
            for layer in self.layers:
                layer.trim(columns)
