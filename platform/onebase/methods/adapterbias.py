"""AdapterBias (Fu et al. 2022): a token-dependent shift of each feed-forward output,
v * alpha(h), where v is one trained vector per layer and alpha a linear layer giving each token
its own weight; layer norms train too. About 2 x hidden parameters per layer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from onebase.methods.base import Method
from onebase.methods.native import add_output_adapters, load_native, native_export
from onebase.spec.method_configs import AdapterBiasConfig
from onebase.spec.schema import MethodConfig

FFN_OUTPUTS = {
    "bert": [r"layer\.\d+\.output\.dense$"],
    "roberta": [r"layer\.\d+\.output\.dense$"],
    "llama": [r"mlp\.down_proj$"],
    "mistral": [r"mlp\.down_proj$"],
    "qwen2": [r"mlp\.down_proj$"],
    "gpt2": [r"mlp\.c_proj$"],
}


class TokenShift(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        # v starts at zero so training starts from the base's exact outputs.
        self.vector = nn.Parameter(torch.zeros(width))
        self.alpha = nn.Linear(width, 1)

    def forward(self, hidden):
        return self.alpha(hidden) * self.vector


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    assert isinstance(config, AdapterBiasConfig)
    return add_output_adapters(model, config, task, "adapterbias", FFN_OUTPUTS, TokenShift)


def load(base: nn.Module, path: Path) -> nn.Module:
    return load_native(base, path, "adapterbias", AdapterBiasConfig, apply)


METHOD = Method(name="adapterbias", config_class=AdapterBiasConfig, apply=apply,
                export=native_export, load=load)
