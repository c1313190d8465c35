"""Every tuning method's fields under `method:` in a job spec, and the tasks it supports.

The spec layer owns these schemas, so a spec validates without importing the methods (torch,
PEFT); each method module in `onebase.methods` implements the config of the same name. Adding a
method: its config class here plus one line in METHOD_CONFIGS, its `Method` in
`onebase/methods/<name>.py` plus one line in `onebase.methods.METHODS`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError

from onebase.errors import validation_line
from onebase.spec.base import MethodConfig
from onebase.tasks import ALL_TASKS, SOFT_PROMPT_TASKS


class FullConfig(MethodConfig):
    tasks: ClassVar[frozenset[str]] = ALL_TASKS
    name: str = "full"


class LoraMethodConfig(MethodConfig):
    tasks: ClassVar[frozenset[str]] = ALL_TASKS
    name: str = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        None, description="module names, 'all-linear', or None for PEFT's default for the architecture")
    bias: str = Field("none", pattern="^(none|all|lora_only)$")


class DoraConfig(LoraMethodConfig):
    name: str = "dora"


class IA3MethodConfig(MethodConfig):
    tasks: ClassVar[frozenset[str]] = ALL_TASKS
    name: str = "ia3"
    target_modules: list[str] | None = Field(None, description="None: PEFT's default for the architecture")
    feedforward_modules: list[str] | None = Field(
        None, description="the subset of target_modules rescaled on their input (feed-forward layers)")


class PromptLearningConfig(MethodConfig):
    """What PEFT's prompt-learning methods share. Soft prompts are extra input positions, so tasks
    that label every position (token classification, extractive QA) are not supported."""

    tasks: ClassVar[frozenset[str]] = SOFT_PROMPT_TASKS
    num_virtual_tokens: int = Field(20, gt=0, le=512)


class PrefixConfig(PromptLearningConfig):
    # Prefixes enter attention only (no extra input positions), so every task head works.
    tasks: ClassVar[frozenset[str]] = ALL_TASKS
    name: str = "prefix"
    projection: bool = Field(False, description="reparameterise the prefix through an MLP (more stable, larger)")
    encoder_hidden_size: int = Field(128, gt=0)


class PromptTuningMethodConfig(PromptLearningConfig):
    name: str = "prompt"


class PTuningConfig(PromptLearningConfig):
    name: str = "ptuning"
    encoder_hidden_size: int = Field(128, gt=0)
    encoder_type: Literal["MLP", "LSTM"] = "MLP"


class BitFitConfig(MethodConfig):
    tasks: ClassVar[frozenset[str]] = ALL_TASKS
    name: str = "bitfit"


class HoulsbyConfig(MethodConfig):
    tasks: ClassVar[frozenset[str]] = ALL_TASKS
    name: str = "houlsby"
    bottleneck: int = Field(64, gt=0, description="width of the down-projection")
    targets: list[str] | None = Field(None, description="regexes over module names; None: per architecture")
    train_layer_norm: bool = True


class AdapterBiasConfig(MethodConfig):
    tasks: ClassVar[frozenset[str]] = ALL_TASKS
    name: str = "adapterbias"
    targets: list[str] | None = Field(None, description="regexes over module names; None: per architecture")
    train_layer_norm: bool = True


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {
    config.model_fields["name"].default: config
    for config in (FullConfig, LoraMethodConfig, DoraConfig, IA3MethodConfig, PrefixConfig, PromptTuningMethodConfig,
                   PTuningConfig, BitFitConfig, HoulsbyConfig, AdapterBiasConfig)
}


def config_class(name: str) -> type[MethodConfig]:
    try:
        return METHOD_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(sorted(METHOD_CONFIGS))})") from None


def method_config(value: Any) -> MethodConfig:
    """Validate the spec's `method:` mapping with the named method's own config class."""
    if isinstance(value, MethodConfig):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError("needs a mapping with a 'name' (e.g. {name: lora, r: 8})")
    name = str(value["name"])
    try:
        return config_class(name).model_validate(value)
    except ValidationError as err:
        raise ValueError(f"{validation_line(err)} (for method {name})") from None


def method_tasks(name: str) -> frozenset[str]:
    return getattr(config_class(name), "tasks", ALL_TASKS)


def check_method_task(config: MethodConfig, task: str) -> None:
    tasks = method_tasks(config.name)
    if task not in tasks:
        raise ValueError(f"method {config.name} does not support task {task} (supports: {', '.join(sorted(tasks))})")
