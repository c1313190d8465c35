"""What every tuning method provides to the train loop, the exporter and the loader."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onebase.spec.base import MethodConfig
from onebase.tasks import ALL_TASKS  # noqa: F401 - still importable from here


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[MethodConfig]  # its fields under `method:`, and its `tasks` (spec/method_configs.py)
    # Wrap or modify the freshly loaded base so that only the method's parameters train.
    apply: Callable[[nn.Module, MethodConfig, str], nn.Module]
    # Write what was trained to a directory, given the full (gathered) state dict of the model.
    export: Callable[[nn.Module, dict[str, torch.Tensor], Path], None]
    # Rebuild the tuned model from a fresh base and an exported directory.
    load: Callable[[nn.Module, Path], nn.Module]
    # True when the export holds only the method's weights (an adapter), not the whole model.
    is_adapter: bool = True
    # Optional check against the base's HF config (raise ValueError): bases the method cannot use.
    check_base: Callable[[Any, str], None] | None = None

    @property
    def tasks(self) -> frozenset[str]:
        return self.config_class.tasks  # type: ignore[attr-defined]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitions report their full size via ds_numel."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def verify_adapter_file(path: Path) -> int:
    """Check a saved adapter holds real tensors; ZeRO-3 without gathering saves empty ones.

    Returns the number of parameters stored.
    """
    from safetensors.torch import load_file

    if not path.is_file():
        raise RuntimeError(f"adapter export missing: {path}")
    tensors = load_file(path)
    empty = [name for name, t in tensors.items() if t.numel() == 0]
    if not tensors or empty:
        raise RuntimeError(f"adapter export {path} is empty ({len(tensors)} tensors, {len(empty)} empty)")
    return sum(t.numel() for t in tensors.values())
