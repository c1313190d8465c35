"""Full fine-tuning: every weight trains; the export is a complete HF model directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from onebase.methods.base import Method
from onebase.spec.method_configs import FullConfig
from onebase.spec.schema import MethodConfig


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def export(model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)


def load(base: nn.Module, path: Path) -> nn.Module:
    return type(base).from_pretrained(path)


METHOD = Method(name="full", config_class=FullConfig, apply=apply, export=export,
                load=load, is_adapter=False)
