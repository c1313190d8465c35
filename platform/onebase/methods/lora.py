"""LoRA (PEFT): low-rank updates on chosen linear layers; task heads travel with the adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from onebase.methods.base import Method, verify_adapter_file
from onebase.spec.method_configs import LoraMethodConfig
from onebase.spec.schema import MethodConfig
from onebase.tasks import PEFT_TASK_TYPES


def peft_config(config: LoraMethodConfig, task: str, **extra):
    from peft import LoraConfig

    return LoraConfig(task_type=PEFT_TASK_TYPES[task], r=config.r, lora_alpha=config.alpha,
                      lora_dropout=config.dropout, target_modules=config.target_modules,
                      bias=config.bias, **extra)


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    from peft import get_peft_model

    assert isinstance(config, LoraMethodConfig)
    return get_peft_model(model, peft_config(config, task))


def export_peft(model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Save in plain PEFT format from a gathered state dict, then check the file is not empty."""
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    verify_adapter_file(out_dir / "adapter_model.safetensors")


def load_peft(base: nn.Module, path: Path) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, path)


METHOD = Method(name="lora", config_class=LoraMethodConfig, apply=apply,
                export=export_peft, load=load_peft)
