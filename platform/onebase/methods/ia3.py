"""IA3 (PEFT): learned vectors that rescale keys, values and the feed-forward activations."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from onebase.methods.base import ALL_TASKS, Method
from onebase.methods.lora import PEFT_TASK_TYPES, export_peft, load_peft
from onebase.spec.schema import MethodConfig


class IA3MethodConfig(MethodConfig):
    name: str = "ia3"
    target_modules: list[str] | None = Field(None, description="None: PEFT's default for the architecture")
    feedforward_modules: list[str] | None = Field(
        None, description="the subset of target_modules rescaled on their input (feed-forward layers)")


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    from peft import IA3Config, get_peft_model

    assert isinstance(config, IA3MethodConfig)
    return get_peft_model(model, IA3Config(task_type=PEFT_TASK_TYPES[task], target_modules=config.target_modules,
                                           feedforward_modules=config.feedforward_modules))


METHOD = Method(name="ia3", config_class=IA3MethodConfig, tasks=ALL_TASKS, apply=apply,
                export=export_peft, load=load_peft)
