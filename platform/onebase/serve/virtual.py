"""Prompt-learning adapters' virtual tokens, computed once per adapter and reused by every row.

PEFT rebuilds a soft prompt (prompt tuning, P-tuning) or a prefix (prefix tuning) in each forward
of its own model, which cannot continue from a KV cache. They do not depend on the input, so the
engine asks PEFT for them once at load (`PeftModel.get_prompt`, exactly what its forward uses) and
runs the adapter's rows on the bare base: the soft prompt goes in front of the prompt's input
embeddings at prefill, a prefix is the cache the prompt continues from; every later step decodes
from the KV cache like any other row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VirtualTokens:
    """One adapter's virtual tokens: `embeds` (soft prompt, [count, hidden]) or `prefix` (per layer
    keys and values, [1, kv heads, count, head dim]); `base` is the model its rows run on."""

    count: int
    base: nn.Module
    embeds: torch.Tensor | None = None
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def cache(self, rows: int):
        """A fresh cache holding the prefix for `rows` rows (empty for a soft prompt)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.prefix or ()):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)
        return cache

    def inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of `ids` with the soft prompt in front of every row (where PEFT puts it)."""
        embeds = self.base.get_input_embeddings()(ids)
        return torch.cat([self.embeds.to(embeds.dtype).expand(len(ids), -1, -1), embeds], dim=1)


def prompt_learning(model: nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@torch.inference_mode()
def virtual_tokens(model: nn.Module) -> VirtualTokens | None:
    """The virtual tokens of a PEFT prompt-learning causal LM (None for any other model)."""
    if not prompt_learning(model):
        return None
    config = model.active_peft_config
    if config.peft_type not in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
        return None  # multitask prompt tuning, CPT: per-task or training-time prompts; recomputed
    prompt = model.get_prompt(batch_size=1)
    tokens = VirtualTokens(config.num_virtual_tokens, model.get_base_model())
    if config.peft_type == "PREFIX_TUNING":
        if not hasattr(prompt, "layers"):
            return None  # a cache of another kind (encoder-decoder): its rows are recomputed
        tokens.prefix = [(layer.keys.clone(), layer.values.clone()) for layer in prompt.layers]
    else:
        tokens.embeds = prompt[0].clone()
    return tokens
