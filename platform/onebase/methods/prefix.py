"""Prefix tuning (PEFT): trained key/value prefixes in every attention layer.

Prefixes enter attention only (no extra input positions), so every task head works.
"""

from __future__ import annotations

from torch import nn

from onebase.methods.base import Method
from onebase.methods.lora import PEFT_TASK_TYPES, export_peft, load_peft
from onebase.spec.method_configs import PrefixConfig
from onebase.spec.schema import MethodConfig


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    assert isinstance(config, PrefixConfig)
    return get_peft_model(model, PrefixTuningConfig(
        task_type=PEFT_TASK_TYPES[task], num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.projection, encoder_hidden_size=config.encoder_hidden_size))


METHOD = Method(name="prefix", config_class=PrefixConfig, apply=apply,
                export=export_peft, load=load_peft)
