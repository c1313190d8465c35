"""IA3 (PEFT): learned vectors that rescale keys, values and the feed-forward activations."""

from __future__ import annotations

from torch import nn

from onebase.methods.base import Method
from onebase.methods.lora import PEFT_TASK_TYPES, export_peft, load_peft
from onebase.spec.method_configs import IA3MethodConfig
from onebase.spec.schema import MethodConfig


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    from peft import IA3Config, get_peft_model

    assert isinstance(config, IA3MethodConfig)
    return get_peft_model(model, IA3Config(task_type=PEFT_TASK_TYPES[task], target_modules=config.target_modules,
                                           feedforward_modules=config.feedforward_modules))


METHOD = Method(name="ia3", config_class=IA3MethodConfig, apply=apply,
                export=export_peft, load=load_peft)
