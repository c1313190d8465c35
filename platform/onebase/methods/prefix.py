"""Prefix tuning (PEFT): trained key/value prefixes in every attention layer.

Prefixes enter attention only (no extra input positions), so every task head works.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from onebase.methods.base import ALL_TASKS, Method
from onebase.methods.lora import PEFT_TASK_TYPES, export_peft, load_peft
from onebase.methods.prompt_learning import PromptLearningConfig
from onebase.spec.schema import MethodConfig


class PrefixConfig(PromptLearningConfig):
    name: str = "prefix"
    projection: bool = Field(False, description="reparameterise the prefix through an MLP (more stable, larger)")
    encoder_hidden_size: int = Field(128, gt=0)


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    assert isinstance(config, PrefixConfig)
    return get_peft_model(model, PrefixTuningConfig(
        task_type=PEFT_TASK_TYPES[task], num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.projection, encoder_hidden_size=config.encoder_hidden_size))


METHOD = Method(name="prefix", config_class=PrefixConfig, tasks=ALL_TASKS, apply=apply,
                export=export_peft, load=load_peft)
