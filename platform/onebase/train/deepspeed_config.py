"""Build the DeepSpeed config dict from the spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from onebase.spec.schema import JobSpec

ZERO3_BUCKET = 50_000_000  # elements (200 MB in fp32): ZeRO-3's gradient bucket and parameter prefetch


def resolve_precision(requested: str, on_gpu: bool) -> str:
    """auto: bf16 on GPUs that support it, fp32 otherwise (CPU training stays fp32)."""
    if requested != "auto":
        return requested
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(spec: JobSpec, precision: str) -> dict[str, Any]:
    ds = spec.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    for field in ("offload_optimizer", "offload_param"):
        device = getattr(ds, field)
        if device:
            zero[field] = {"device": device, "pin_memory": spec.scaling.use_gpu}
        if device == "nvme":  # a folder per job: DeepSpeed's swap files are named by rank only
            zero[field]["nvme_path"] = str(Path(ds.nvme_path or "/") / spec.name)
    if ds.stage == 3:
        # ZeRO-3 allocates its gradient bucket up front at reduce_bucket_size elements (default 5e8: 2 GB in
        # fp32), more than a small model's gradients: per-worker memory then grew instead of shrinking.
        zero.update({"reduce_bucket_size": ZERO3_BUCKET, "stage3_prefetch_bucket_size": ZERO3_BUCKET})
    return {
        "train_micro_batch_size_per_gpu": spec.train.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": spec.train.max_grad_norm,
        "zero_optimization": zero,
        # We pass a torch AdamW: it avoids JIT-compiling DeepSpeed's fused/CPU Adam on every new machine.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
