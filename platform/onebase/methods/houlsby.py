"""Houlsby bottleneck adapters: down-project, nonlinearity, up-project, added after the attention
and the feed-forward sublayers of every block (Houlsby et al. 2019); layer norms train too."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from onebase.methods.base import Method
from onebase.methods.native import add_output_adapters, load_native, native_export
from onebase.spec.method_configs import HoulsbyConfig
from onebase.spec.schema import MethodConfig

# Each block's sublayer output projections, before the residual add.
SUBLAYER_OUTPUTS = {
    "bert": [r"attention\.output\.dense$", r"layer\.\d+\.output\.dense$"],
    "roberta": [r"attention\.output\.dense$", r"layer\.\d+\.output\.dense$"],
    "llama": [r"self_attn\.o_proj$", r"mlp\.down_proj$"],
    "mistral": [r"self_attn\.o_proj$", r"mlp\.down_proj$"],
    "qwen2": [r"self_attn\.o_proj$", r"mlp\.down_proj$"],
    "gpt2": [r"attn\.c_proj$", r"mlp\.c_proj$"],
}


class Bottleneck(nn.Module):
    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        # Near-identity start (the paper's small init): the up-projection begins at zero.
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden):
        return self.up(nn.functional.gelu(self.down(hidden)))


def apply(model: nn.Module, config: MethodConfig, task: str) -> nn.Module:
    assert isinstance(config, HoulsbyConfig)
    return add_output_adapters(model, config, task, "houlsby", SUBLAYER_OUTPUTS,
                               lambda width: Bottleneck(width, config.bottleneck))


def load(base: nn.Module, path: Path) -> nn.Module:
    return load_native(base, path, "houlsby", HoulsbyConfig, apply)


METHOD = Method(name="houlsby", config_class=HoulsbyConfig, apply=apply, export=native_export,
                load=load)
