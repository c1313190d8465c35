"""A replica's KV-cache budget: how many cache positions its running batches may hold at once.

A request is admitted into the running batch only when its *reservation* fits: prompt tokens +
`max_tokens`, taken at admission and held until it leaves. Reserving the most it can ever need,
rather than counting prompt + tokens generated so far, is what makes a budget safe here: the
decoder has no way to preempt a running row (no swapping, no recompute-and-requeue), so a budget
counted on current lengths would be overrun by rows that keep growing after admission.

The cache of a batch is one dense, left-padded tensor: every row is as wide as the batch's longest
row (`decode._Batch`). So a batch costs rows x its longest reservation, and the replica's total is
the sum over its batches (one per LoRA pool, one per other adapter). That is the bound on the
positions the cache tensors really hold, which `Decoder` also measures after every forward
(`held`, `peak_held`) beside the reservations (`reserved`, `peak_reserved`).

Admission is FIFO: when the request at the head of the queue does not fit, nothing behind it is
admitted either, so a long request is never starved by a stream of short ones; it starts as soon
as enough running rows have left. A request that cannot fit even alone is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def reservation(seq) -> int:
    """Cache positions a sequence may need before it ends: its prompt and every token it may generate
    (behind a prompt-learning adapter's virtual tokens, which hold cache positions too)."""
    virtual = getattr(seq.runner, "virtual", None)
    return len(seq.prompt) + seq.sampling.max_tokens + (virtual.count if virtual is not None else 0)


def batch_cost(seqs: Iterable) -> int:
    """What a batch of these sequences may hold: rows x the longest reservation (rows are padded to it)."""
    sizes = [reservation(s) for s in seqs]
    return len(sizes) * max(sizes, default=0)


class KvBudget:
    """The budget (None: unbounded) and the figures `GET /admin/adapters` shows per replica."""

    def __init__(self, tokens: int | None = None) -> None:
        self.tokens = tokens
        self.reserved = self.peak_reserved = 0
        self.held = self.peak_held = 0
        self.waited = 0  # sequences that waited at least one step for room in the budget

    def cost(self, groups: dict[Any, list]) -> int:
        """The reservation of running batches (model key -> sequences)."""
        return sum(batch_cost(seqs) for seqs in groups.values())

    def fits(self, groups: dict[Any, list], key: Any, seq) -> bool:
        """Whether `seq` may join batch `key` with `groups` running (and admitted this step)."""
        if self.tokens is None:
            return True
        joined = {**groups, key: [*groups.get(key, []), seq]}
        return self.cost(joined) <= self.tokens

    def alone_too_large(self, seq) -> str | None:
        """Why `seq` can never run on this replica (None: it can, once there is room)."""
        if self.tokens is None or reservation(seq) <= self.tokens:
            return None
        return (f"prompt ({len(seq.prompt)} tokens) + max_tokens ({seq.sampling.max_tokens}) need "
                f"{reservation(seq)} KV-cache positions; a replica holds at most {self.tokens} "
                "(limits.kv_cache_tokens)")

    def note(self, reserved: int | None = None, held: int | None = None) -> None:
        if reserved is not None:
            self.reserved, self.peak_reserved = reserved, max(self.peak_reserved, reserved)
        if held is not None:
            self.held, self.peak_held = held, max(self.peak_held, held)

    def summary(self) -> dict[str, Any]:
        return {"budget": self.tokens, "reserved": self.reserved, "peak_reserved": self.peak_reserved,
                "held": self.held, "peak_held": self.peak_held, "waited": self.waited}
