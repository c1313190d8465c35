"""Prompt tuning (PEFT): a trained soft prompt of virtual token embeddings; the base stays frozen."""

from __future__ import annotations

from torch import nn

from onebase.methods.base import Method
from onebase.methods.lora import PEFT_TASK_TYPES, export_peft, load_peft
from onebase.methods.prompt_learning import check_soft_prompt_base
from onebase.spec.method_configs import PromptTuningMethodConfig
from onebase.spec.schema import MethodConfig


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    from peft import PromptTuningConfig, get_peft_model

    assert isinstance(config, PromptTuningMethodConfig)
    return get_peft_model(model, PromptTuningConfig(task_type=PEFT_TASK_TYPES[task],
                                                    num_virtual_tokens=config.num_virtual_tokens))


METHOD = Method(name="prompt", config_class=PromptTuningMethodConfig, apply=apply,
                export=export_peft, load=load_peft,
                check_base=lambda model_config, task: check_soft_prompt_base("prompt", model_config, task))
