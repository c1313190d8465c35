"""BitFit: train only the bias terms of the base (plus the task head); ~0.1% of the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from onebase.methods.base import Method
from onebase.methods.native import load_native, native_export, remember, train_only
from onebase.spec.method_configs import BitFitConfig
from onebase.spec.schema import MethodConfig


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    if not any(name.endswith(".bias") for name, _ in model.named_parameters()):
        raise ValueError(f"method bitfit: {type(model).__name__} has no bias parameters to train")
    train_only(model, lambda name: name.endswith(".bias"))
    return remember(model, "bitfit", config, task)


def check_base(model_config: Any, task: str) -> None:
    # Llama-style bases (SmolLM2 included) are built without biases: BitFit would train nothing.
    if getattr(model_config, "attention_bias", None) is False and not getattr(model_config, "mlp_bias", False):
        raise ValueError(f"method bitfit: {model_config.model_type} models have no bias terms to train")


def load(base: nn.Module, path: Path) -> nn.Module:
    return load_native(base, path, "bitfit", BitFitConfig, apply)


METHOD = Method(name="bitfit", config_class=BitFitConfig, apply=apply, export=native_export,
                load=load, check_base=check_base)
