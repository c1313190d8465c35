"""Reuse of prompt KV across requests: a prompt that starts like an earlier one on the same adapter
skips prefilling the part they share (vLLM's automatic prefix caching, SGLang's radix reuse).

Chat templates put the same system turn in front of every request, few-shot prompts share their
demonstrations, and a multi-turn chat resends the whole conversation each turn; a causal model's
keys and values for a prefix depend on that prefix alone (and on the adapter: LoRA changes them),
so they can be kept from one request and reused by the next.

Each admitted prompt's KV is kept per *owner* (the running batch's model and the row's adapter),
up to a budget of cached token positions, least recently used first out. A new prompt reuses the
longest common prefix with any kept prompt of its owner, at most all but its last token (the last
one's logits start the answer). An adapter's entries go when it is unloaded.

The batch layout does not change: rows stay left-padded to the longest prompt, and the group's
reused columns are the same for every row (`plan`), so the KV budget's reservations still bound
what a batch holds. Arrivals with nothing kept are prefilled apart when they would cut the others'
reuse by enough to pay for a second forward (`decode._Batch._reuse_groups`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

MIN_REUSE = 8  # shorter shared prefixes are not worth a lookup's copies


@dataclass
class Entry:
    owner: tuple[int, str | None]
    tokens: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer keys, values: [1, kv heads, tokens, head dim]


class PrefixCache:
    """Kept prompt KV per owner, at most `max_tokens` positions in all (0: off)."""

    def __init__(self, max_tokens: int = 0) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # id -> entry, least recently used first
        self.held = 0
        self.hits = self.misses = self.reused = self.prefilled = 0

    def lookup(self, owner: tuple[int, str | None], prompt: list[int], touch: bool = True) -> tuple[int, Entry | None]:
        """The longest kept prefix of `prompt` for this owner (at most len - 1 tokens) and its entry;
        `touch`: count it as used (least recently used entries go first)."""
        best, found = 0, None
        if self.max_tokens:
            for entry in self.entries.values():
                if entry.owner == owner:
                    shared = _common_prefix(prompt, entry.tokens, len(prompt) - 1)
                    if shared > best:
                        best, found = shared, entry
        if best < MIN_REUSE:
            return 0, None
        if touch:
            self.entries.move_to_end(id(found))
        return best, found

    def wants(self, owner: tuple[int, str | None], prompt: list[int]) -> bool:
        """Whether `store` would keep this prompt (not off, not too short or long, not kept already)."""
        if not self.max_tokens or len(prompt) < MIN_REUSE or len(prompt) > self.max_tokens:
            return False
        return not any(e.owner == owner and _common_prefix(prompt, e.tokens, len(prompt)) == len(prompt)
                       for e in self.entries.values())

    def store(self, owner: tuple[int, str | None], prompt: list[int],
              layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a prompt's KV (`layers`: its own copies). A prompt that a kept one already begins with is
        not kept twice; a kept prompt that this one extends is replaced by it."""
        if not self.wants(owner, prompt):
            return
        for key, entry in list(self.entries.items()):
            if entry.owner == owner and _common_prefix(prompt, entry.tokens, len(prompt)) == len(entry.tokens):
                self._remove(key)
        entry = Entry(owner, list(prompt), layers)
        self.entries[id(entry)] = entry
        self.held += len(prompt)
        while self.held > self.max_tokens:
            self._remove(next(iter(self.entries)))

    def count(self, lengths: list[int], reused: list[int]) -> None:
        """A prefill's figures: per row its prompt length and the leading tokens it took from here."""
        if self.max_tokens:
            self.hits += sum(1 for r in reused if r)
            self.misses += sum(1 for r in reused if not r)
            self.reused += sum(reused)
            self.prefilled += sum(lengths) - sum(reused)

    def drop(self, adapter_key: str | None) -> None:
        """Forget an unloaded adapter's prompts."""
        for key in [k for k, e in self.entries.items() if e.owner[1] == adapter_key]:
            self._remove(key)

    def _remove(self, key: int) -> None:
        self.held -= len(self.entries.pop(key).tokens)

    def summary(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "held_tokens": self.held, "prompts": len(self.entries),
                "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused,
                "prefilled_tokens": self.prefilled}


def plan(lengths: list[int], hits: list[int]) -> int:
    """How many leading columns of a left-padded prefill come from kept KV (the same for every row, so
    the layout stays rows x longest prompt): the group prefills the last S columns, S = the longest
    part any row must compute, and each row reuses its first len - S tokens (none when shorter than S)."""
    width = max(lengths)
    suffix = max(n - h for n, h in zip(lengths, hits))
    return width - suffix


def reuse(lengths: list[int], hits: list[int]) -> list[int]:
    """Per row, the leading prompt tokens one prefill of these rows takes from kept KV (`plan`'s
    columns: a row reuses len - S of them, none when shorter than S or with nothing kept)."""
    suffix = max(lengths) - plan(lengths, hits)
    return [max(0, n - suffix) if h else 0 for n, h in zip(lengths, hits)]


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most `limit` (list slices compare in C)."""
    high = min(len(a), len(b), limit)
    if a[:high] == b[:high]:
        return high
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low
