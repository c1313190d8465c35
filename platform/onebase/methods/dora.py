"""DoRA (PEFT): LoRA whose update is split into a learned magnitude and a low-rank direction."""

from __future__ import annotations

from torch import nn

from onebase.methods.base import Method
from onebase.methods.lora import export_peft, load_peft, peft_config
from onebase.spec.method_configs import DoraConfig
from onebase.spec.schema import MethodConfig


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    from peft import get_peft_model

    assert isinstance(config, DoraConfig)
    return get_peft_model(model, peft_config(config, task, use_dora=True))


METHOD = Method(name="dora", config_class=DoraConfig, apply=apply,
                export=export_peft, load=load_peft)
