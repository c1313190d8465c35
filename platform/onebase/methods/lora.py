"""LoRA (PEFT): low-rank updates on chosen linear layers; task heads travel with the adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from onebase.methods.base import ALL_TASKS, Method, verify_adapter_file
from onebase.spec.schema import MethodConfig

PEFT_TASK_TYPES = {
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "extractive-qa": "QUESTION_ANS",
    "causal-lm": "CAUSAL_LM",
}


class LoraMethodConfig(MethodConfig):
    name: str = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        None, description="module names, 'all-linear', or None for PEFT's default for the architecture")
    bias: str = Field("none", pattern="^(none|all|lora_only)$")


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


METHOD = Method(name="lora", config_class=LoraMethodConfig, tasks=ALL_TASKS, apply=apply,
                export=export_peft, load=load_peft)
