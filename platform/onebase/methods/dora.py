"""DoRA (PEFT): LoRA whose update is split into a learned magnitude and a low-rank direction."""

from __future__ import annotations

from torch import nn

from onebase.methods.base import ALL_TASKS, Method
from onebase.methods.lora import LoraMethodConfig, export_peft, load_peft, peft_config
from onebase.spec.schema import MethodConfig


class DoraConfig(LoraMethodConfig):
    name: str = "dora"


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    from peft import get_peft_model

    assert isinstance(config, DoraConfig)
    return get_peft_model(model, peft_config(config, task, use_dora=True))


METHOD = Method(name="dora", config_class=DoraConfig, tasks=ALL_TASKS, apply=apply,
                export=export_peft, load=load_peft)
