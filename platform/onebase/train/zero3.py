"""ZeRO-3 on each worker: build the model already partitioned, and read it back one tensor at a time.

With `HfDeepSpeedConfig` alive, transformers creates models inside `deepspeed.zero.Init`: every
parameter is split across the workers as it is created, and `from_pretrained` loads the weights
straight into the shards. No worker ever holds the whole model, before training or at export.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch
from torch import nn


def partitioned_loading(ds_config: dict[str, Any]):
    """Keep the returned object alive while models are built and wrapped: transformers holds only a
    weak reference to it. None when the config is not ZeRO-3."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: list[torch.Tensor]):
    """The full values of partitioned parameters inside the block (a collective: every rank enters)."""
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def fingerprint(model: nn.Module, rank: int) -> str:
    """onebase.model.build.base_fingerprint (same bytes, same digest) of a possibly partitioned model,
    gathering one parameter at a time; every rank must call it, rank 0 gets the digest."""
    backbone = getattr(model, "base_model", model)
    params = dict(backbone.named_parameters(remove_duplicate=False))
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        param = params.get(name)
        with gathered([param] if param is not None else []):
            if rank == 0:
                value = param.data if param is not None else tensor
                digest.update(name.encode())
                digest.update(value.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest() if rank == 0 else ""


def trainable_state_dict(model: nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """What an adapter export writes: the trained tensors only, gathered one at a time to rank 0."""
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        with gathered([param]):
            if rank == 0:
                out[name] = param.data.detach().cpu().clone()
    return out if rank == 0 else None


def resident_param_bytes(model: nn.Module) -> int:
    """Parameter bytes this worker holds: its shard of partitioned parameters, all of the others."""
    total = 0
    for param in model.parameters():
        held = param.ds_tensor if is_partitioned(param) else param
        total += held.numel() * held.element_size()
    return total


def keep_used_conversions(model: nn.Module) -> None:
    """Saving reverses the renamings transformers applied when loading. Loaded under ZeRO-3, a model
    kept transformers' whole legacy table (a plain load keeps only the renamings it used), so a full
    export wrote `LayerNorm.gamma` for `LayerNorm.weight`: keep only what was used, as a plain load does."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if getattr(c, "was_used", lambda: True)()]


def honor_init_dtype() -> None:
    """Make DeepSpeed's zero.Init keep the dtype it is given (idempotent; call before initialize).

    DeepSpeed 0.19 sets it with `dtype or torch.float16 if fp16_supported() else torch.bfloat16 ...`,
    which Python reads as `(dtype or float16) if fp16_supported() else bfloat16`: on a CPU without
    fp16 kernels an explicit dtype is dropped for bfloat16. ZeRO-3 over a model built whole (random
    init) passes the model's dtype there, so with `offload_param: nvme` the fp32 shards went through
    bf16 swap buffers (16 of fp32's 23 mantissa bits lost): a tiny model's export drifted 5e-3 from
    the same run offloaded to CPU memory. A dtype of None still means "from the config", as before.
    """
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

    original = Init._set_dtype
    if getattr(original, "onebase_keeps_dtype", False):
        return

    def _set_dtype(self, ds_config, dtype):
        original(self, ds_config, dtype)
        if dtype is not None:
            self.dtype = dtype

    _set_dtype.onebase_keeps_dtype = True  # type: ignore[attr-defined]
    Init._set_dtype = _set_dtype


def largest_shard(spec, path: str, labels: list[str] | None, world: int) -> int:
    """Elements of one worker's part of the job's largest parameter (ZeRO-3 splits each parameter
    evenly, padding the last part), from the model built on the meta device: no memory, no weights."""
    from onebase.model.build import model_class, model_config

    with torch.device("meta"):
        model = model_class(spec.task).from_config(model_config(spec, path, labels))
    return -(-max(p.numel() for p in model.parameters()) // world)
