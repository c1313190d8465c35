"""Batched forwards of a frozen causal LM after a shared prefix, with the prefix's KV cache kept.

`PrefixLM(model, prefix_ids)` computes the prefix once; every batch gets its own copy of that
cache (copy-on-use: the model appends to a cache in place), so batches never see each other.
Rows after the prefix are left-padded *after* the prefix, with explicit position ids, so padding
never shifts a real token's position; `cached=False` runs the very same tokens without the cache.
The model's weights are never written: everything runs under `torch.no_grad()` in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


class PrefixLM:
    def __init__(self, model, prefix_ids: list[int], pad_id: int, cached: bool = True) -> None:
        self.model = model
        self.prefix = torch.tensor([prefix_ids], dtype=torch.long)
        self.pad_id = pad_id
        self.cached = cached and len(prefix_ids) > 0
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if self.cached:
            with torch.no_grad():
                out = model(input_ids=self.prefix, use_cache=True)
            self._kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    @property
    def prefix_len(self) -> int:
        return self.prefix.shape[1]

    def _cache(self, batch: int):
        from transformers import DynamicCache

        # Expanded and copied per batch: the model appends to these tensors' successors, never to ours.
        return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1).contiguous(),
                                             v.expand(batch, -1, -1, -1).contiguous()) for k, v in self._kv])

    def forward(self, rows: list[list[int]], keep: int = 1) -> tuple[torch.Tensor, torch.Tensor, object, torch.Tensor]:
        """Logits over the rows' last `keep` positions [B, keep, V], the full attention mask, the cache and
        the last position ids. Only the kept positions go through the LM head (a vocabulary-wide matmul)."""
        batch, width, plen = len(rows), max(len(r) for r in rows), self.prefix_len
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        own = torch.zeros((batch, width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row):] = torch.tensor(row)
                own[i, width - len(row):] = 1
        mask = torch.cat([torch.ones((batch, plen), dtype=torch.long), own], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            if self.cached:
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions[:, plen:],
                                 past_key_values=self._cache(batch), use_cache=True, logits_to_keep=keep)
            else:
                full = torch.cat([self.prefix.expand(batch, -1), ids], dim=1)
                out = self.model(input_ids=full, attention_mask=mask, position_ids=positions, use_cache=True,
                                 logits_to_keep=keep)
        return out.logits, mask, out.past_key_values, positions[:, -1]

    def loglik(self, rows: list[list[int]], choices: list[list[int]], batch_size: int = 16) -> list[list[float]]:
        """Sum log p(choice | prefix + row) for every row and every choice, the lm-evaluation-harness way.

        Each row runs once; its KV cache is then shared by the choices (a new cache object per choice,
        so no choice sees another's tokens), which makes scoring 3 labels cost little more than 1.
        """
        scores: list[list[float]] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            logits, mask, cache, last_pos = self.forward(chunk, keep=1)
            first = torch.log_softmax(logits[:, -1].float(), dim=-1)
            per_choice = [self._choice(first, mask, cache, last_pos, choice) for choice in choices]
            scores += [[per_choice[j][i] for j in range(len(choices))] for i in range(len(chunk))]
        return scores

    def _choice(self, first: torch.Tensor, mask: torch.Tensor, cache, last_pos: torch.Tensor,
                choice: list[int]) -> list[float]:
        from transformers import DynamicCache

        total = first[:, choice[0]].clone()
        if len(choice) > 1:
            batch, rest = first.shape[0], len(choice) - 1
            fork = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache.layers])
            ids = torch.tensor([choice[:-1]] * batch)
            with torch.no_grad():
                out = self.model(input_ids=ids, attention_mask=torch.cat([mask, torch.ones((batch, rest),
                                                                                          dtype=torch.long)], 1),
                                 position_ids=last_pos[:, None] + torch.arange(1, rest + 1), past_key_values=fork,
                                 use_cache=True)
            logprobs = torch.log_softmax(out.logits.float(), dim=-1)
            total += logprobs[:, torch.arange(rest), torch.tensor(choice[1:])].sum(-1)
        return total.tolist()

    def generate(self, rows: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                 sampling: Sampling | None = None) -> list[list[int]]:
        """Greedy (temperature 0) or nucleus-sampled continuations, each cut at its first stop token."""
        sampling = sampling or Sampling()
        generator = torch.Generator().manual_seed(sampling.seed)
        logits, mask, cache, last_pos = self.forward(rows)
        batch = len(rows)
        out: list[list[int]] = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool)
        next_logits = logits[:, -1]
        for _ in range(max_new_tokens):
            token = pick(next_logits, sampling, generator)
            for i in range(batch):
                if not done[i]:
                    if int(token[i]) in stop_ids:
                        done[i] = True
                    else:
                        out[i].append(int(token[i]))
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
            last_pos = last_pos + 1
            with torch.no_grad():
                step = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                                  past_key_values=cache, use_cache=True)
            cache, next_logits = step.past_key_values, step.logits[:, -1]
        return out

    def mean_hidden(self, rows: list[list[int]]) -> torch.Tensor:
        """Mean-pooled last hidden states of each row alone (no prefix): the base's own embedding."""
        batch, width = len(rows), max(len(r) for r in rows)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                logits_to_keep=1).hidden_states[-1]
        summed = (hidden * mask[..., None]).sum(1)
        return summed / mask.sum(1, keepdim=True).clamp(min=1)


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
