"""P-tuning (PEFT): virtual tokens produced by a small MLP/LSTM prompt encoder."""

from __future__ import annotations

from torch import nn

from onebase.methods.base import Method
from onebase.methods.lora import PEFT_TASK_TYPES, export_peft, load_peft
from onebase.methods.prompt_learning import check_soft_prompt_base
from onebase.spec.method_configs import PTuningConfig
from onebase.spec.schema import MethodConfig


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    from peft import PromptEncoderConfig, get_peft_model

    assert isinstance(config, PTuningConfig)
    return get_peft_model(model, PromptEncoderConfig(
        task_type=PEFT_TASK_TYPES[task], num_virtual_tokens=config.num_virtual_tokens,
        encoder_hidden_size=config.encoder_hidden_size, encoder_reparameterization_type=config.encoder_type))


METHOD = Method(name="ptuning", config_class=PTuningConfig, apply=apply,
                export=export_peft, load=load_peft,
                check_base=lambda model_config, task: check_soft_prompt_base("ptuning", model_config, task))
