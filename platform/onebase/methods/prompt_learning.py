"""What PEFT's prompt-learning methods (prompt tuning, P-tuning, prefix tuning) share.

Soft prompts are extra positions in front of the input. Token classification and extractive QA
label every input position, so the virtual tokens would shift those labels: not supported.
A decoder-only classifier reads the last position; PEFT feeds it embeddings without input ids, so
it cannot find the last real token of a right-padded row: not supported either.
"""

from __future__ import annotations

from typing import Any

from onebase.model.build import is_decoder_only
from onebase.spec.method_configs import PromptLearningConfig  # noqa: F401 - still importable from here
from onebase.tasks import SOFT_PROMPT_TASKS  # noqa: F401 - still importable from here


def check_soft_prompt_base(method: str, model_config: Any, task: str) -> None:
    if task == "sequence-classification" and is_decoder_only(model_config):
        raise ValueError(f"method {method} cannot classify with a decoder-only base "
                         f"({model_config.model_type}): use causal-lm with a label set, or lora/ia3/...")
