"""What onebase's own (non-PEFT) methods share: freezing, the task head, export and reload.

Their export is `adapter.safetensors` (only the trained tensors, under the base model's own
parameter names) plus `adapter_config.json` naming the method, its config and the task.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from onebase.methods.base import verify_adapter_file
from onebase.model.build import TIED_HEADS, head_modules  # noqa: F401 - still importable from here
from onebase.spec.schema import MethodConfig

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


def train_only(model: nn.Module, keep: Callable[[str], bool]) -> None:
    """Freeze everything except parameters whose name `keep` accepts and the task head."""
    heads = tuple(f"{name}." for name in head_modules(model))
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name) or name.startswith(heads))


def matching_modules(model: nn.Module, patterns: Iterable[str]) -> list[tuple[str, nn.Module]]:
    compiled = [re.compile(p) for p in patterns]
    return [(name, module) for name, module in model.named_modules() if any(c.search(name) for c in compiled)]


def out_features(module: nn.Module) -> int:
    """Output width of a Linear (or GPT-2's Conv1D, which calls it nf)."""
    width = getattr(module, "out_features", None) or getattr(module, "nf", None)
    if width is None:
        raise ValueError(f"cannot adapt {type(module).__name__}: not a linear layer")
    return int(width)


def read_native_config(path: Path) -> dict:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{path}: no {CONFIG_FILE} (not an onebase adapter)")
    return json.loads(file.read_text())


def load_native(base: nn.Module, path: Path, method: str, config_class: type[MethodConfig],
                apply: Callable[[nn.Module, MethodConfig, str], nn.Module]) -> nn.Module:
    """Re-apply the method to a fresh base, then load the trained tensors; every one must land."""
    saved = read_native_config(path)
    if saved.get("onebase_method") != method:
        raise ValueError(f"{path} holds a {saved.get('onebase_method')!r} adapter, not {method!r}")
    model = apply(base, config_class.model_validate(saved["config"]), saved["task"])
    tensors = load_file(str(Path(path) / WEIGHTS_FILE))
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise ValueError(f"{path}: adapter tensors do not fit this base (e.g. {sorted(missing)[0]})")
    model.load_state_dict(tensors, strict=False)
    return model


def native_export(model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Save the trained tensors only; apply recorded the method, config and task on the model."""
    record = model.onebase_adapter  # type: ignore[attr-defined]
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    tensors = {name: state_dict[name].detach().cpu().contiguous() for name in sorted(trained)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"onebase_method": record["method"]})
    verify_adapter_file(out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(
        {"onebase_method": record["method"], "task": record["task"], "config": record["config"].model_dump()},
        indent=2))


def remember(model: nn.Module, method: str, config: MethodConfig, task: str) -> nn.Module:
    # A plain attribute (not a module or buffer): DeepSpeed and state_dict ignore it.
    object.__setattr__(model, "onebase_adapter", {"method": method, "config": config, "task": task})
    return model


class OutputHook:
    """Adds `adapter(output)` to a layer's output through a forward hook.

    The adapter is registered as a child of the adapted layer, so the base's own parameter names
    stay unchanged (the base fingerprint and a plain base checkpoint still match).
    """

    @staticmethod
    def attach(layer: nn.Module, adapter: nn.Module) -> None:
        layer.add_module("adapter", adapter)
        layer.register_forward_hook(lambda module, args, output: output + module.adapter(output))


def layer_norm_names(model: nn.Module) -> set[str]:
    return {f"{name}.{p}" for name, module in model.named_modules()
            if isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
            for p, _ in module.named_parameters(recurse=False)}


def default_targets(model: nn.Module, table: dict[str, list[str]], method: str) -> list[str]:
    kind = getattr(getattr(model, "config", None), "model_type", "")
    if kind not in table:
        raise ValueError(f"method {method}: no default targets for model type {kind!r}; set method.targets "
                         f"(regexes over module names)")
    return table[kind]


def add_output_adapters(model: nn.Module, config: MethodConfig, task: str, method: str,
                        defaults: dict[str, list[str]], make: Callable[[int], nn.Module]) -> nn.Module:
    """Houlsby-style methods: an adapter on each target layer's output; only adapters, layer norms
    (when config.train_layer_norm) and the task head train."""
    targets = getattr(config, "targets", None) or default_targets(model, defaults, method)
    layers = matching_modules(model, targets)
    if not layers:
        raise ValueError(f"method {method}: method.targets match no module of this base")
    norms = layer_norm_names(model) if getattr(config, "train_layer_norm", False) else set()
    train_only(model, lambda name: name in norms)
    for _, layer in layers:
        OutputHook.attach(layer, make(out_features(layer)))
    return remember(model, method, config, task)
