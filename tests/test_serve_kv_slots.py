"""The running batch's KV buffers (serve/kv_slots.py) hold exactly what concatenating and indexing
plain tensors would, through a random life of a continuous batch: rows join with prompts wider or
narrower than the batch, decode steps append a column, rows leave from anywhere, padding columns go."""

from __future__ import annotations

import random

import torch
from transformers.cache_utils import DynamicCache

from onebase.serve.kv_slots import SlotCache

LAYERS, HEADS, DIM = 2, 3, 4


def prefill(rows: int, width: int, rng: torch.Generator) -> DynamicCache:
    """A prefill's cache: `rows` rows of `width` positions."""
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(torch.randn(rows, HEADS, width, DIM, generator=rng),
                     torch.randn(rows, HEADS, width, DIM, generator=rng), layer)
    return cache


def left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[2]
    return torch.cat([tensor.new_zeros(tensor.shape[0], HEADS, missing, DIM), tensor], dim=2) if missing else tensor


def test_slot_buffers_match_concatenated_tensors_through_a_random_batch_life():
    rng, draw = torch.Generator().manual_seed(0), random.Random(0)
    first = prefill(3, 5, rng)
    slots = SlotCache(first.layers)
    reference = [[layer.keys.clone(), layer.values.clone()] for layer in first.layers]
    valid = torch.ones(3, 5, dtype=torch.bool)  # which positions are a row's own (not padding)
    for _ in range(200):
        action = draw.choice(["step", "step", "join", "leave"])
        rows = reference[0][0].shape[0]
        if action == "step" and rows:
            for layer in range(LAYERS):
                k, v = torch.randn(rows, HEADS, 1, DIM, generator=rng), torch.randn(rows, HEADS, 1, DIM, generator=rng)
                got_k, got_v = slots.update(k, v, layer)
                reference[layer] = [torch.cat([reference[layer][0], k], 2), torch.cat([reference[layer][1], v], 2)]
                assert torch.equal(got_k, reference[layer][0]) and torch.equal(got_v, reference[layer][1])
            valid = torch.cat([valid, torch.ones(rows, 1, dtype=torch.bool)], 1)
        elif action == "join":
            joining = prefill(draw.randint(1, 4), draw.randint(1, 80), rng)  # wider than the batch at times
            width = max(valid.shape[1], joining.layers[0].keys.shape[2])
            slots.append(joining.layers)
            for layer, theirs in enumerate(joining.layers):
                reference[layer] = [torch.cat([left_pad(mine, width), left_pad(new, width)])
                                    for mine, new in zip(reference[layer], (theirs.keys, theirs.values))]
            joined = torch.ones(joining.layers[0].keys.shape[0], joining.layers[0].keys.shape[2], dtype=torch.bool)
            valid = torch.cat([pad_mask(valid, width), pad_mask(joined, width)])
        elif action == "leave" and rows > 1:
            kept = sorted(draw.sample(range(rows), draw.randint(1, rows - 1)))
            order = slots.keep(kept)
            assert sorted(order) == kept  # the same rows, in the order the caller must now use
            start = int(valid[order].any(0).int().argmax())  # columns that are padding for every row go
            slots.trim(start)
            valid = valid[order][:, start:]
            reference = [[k[order][:, :, start:], v[order][:, :, start:]] for k, v in reference]
        # What attention reads equals the concatenated tensors, padding (zeros) included.
        for mine, (keys, values) in zip(slots.layers, reference):
            assert torch.equal(mine.keys, keys) and torch.equal(mine.values, values)
    assert slots.get_seq_length() == valid.shape[1] and valid.all(0).any()


def pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], 1)
