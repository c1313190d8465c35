"""What PEFT's prompt-learning methods (prompt tuning, P-tuning, prefix tuning) share.

Soft prompts are extra positions in front of the input. Token classification and extractive QA
label every input position, so the virtual tokens would shift those labels: not supported.
A decoder-only classifier reads the last position; PEFT feeds it embeddings without input ids, so
it cannot find the last real token of a right-padded row: not supported either.
"""

from __future__ import annotations

from typing import Any

from onebase.spec.method_configs import PromptLearningConfig  # noqa: F401 - still importable from here
from onebase.tasks import SOFT_PROMPT_TASKS  # noqa: F401 - still importable from here


def is_decoder_only(model_config: Any) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(model_config, "model_type", "")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def check_soft_prompt_base(method: str, model_config: Any, task: str) -> None:
    if task == "sequence-classification" and is_decoder_only(model_config):
        raise ValueError(f"method {method} cannot classify with a decoder-only base "
                         f"({model_config.model_type}): use causal-lm with a label set, or lora/ia3/...")
