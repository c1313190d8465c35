"""Build the DeepSpeed config dict from the spec."""

from __future__ import annotations

import contextlib
import os
import shutil
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


def nvme_no_resume(spec: JobSpec) -> str | None:
    """Why this job cannot continue from a checkpoint, or None. DeepSpeed 0.19's ZeRO-3 checkpoints
    hold empty tensors for what its optimizer swapper keeps on NVMe (fp32 weights, Adam moments: a
    resumed run went on from the initial weights' state, its losses off from the next step), and
    loading one into parameters kept on NVMe fails ('NoneType' object has no attribute 'data')."""
    if not spec.deepspeed.on_nvme:
        return None
    return (f"deepspeed.{spec.deepspeed.on_nvme[0]}: nvme: DeepSpeed cannot continue a run offloaded to NVMe from a "
            "checkpoint (it saves the optimizer states kept there empty, and cannot load into parameters kept "
            "there); run the job from the start, or offload to cpu")


def nvme_folder(spec: JobSpec) -> Path | None:
    """Where this job's NVMe offload swaps (a folder per job: DeepSpeed names its files by rank only)."""
    return Path(spec.deepspeed.nvme_path) / spec.name if spec.deepspeed.on_nvme and spec.deepspeed.nvme_path else None


def deepspeed_config(spec: JobSpec, precision: str, largest_shard: int | None = None) -> dict[str, Any]:
    """`largest_shard`: elements of one worker's part of the model's largest parameter; with NVMe
    offload it sizes DeepSpeed's swap buffers (see nvme_sizes), without it they keep its defaults."""
    ds = spec.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    for field in ("offload_optimizer", "offload_param"):
        device = getattr(ds, field)
        if device:
            zero[field] = {"device": device, "pin_memory": spec.scaling.use_gpu}
        if device == "nvme":
            zero[field]["nvme_path"] = str(nvme_folder(spec))
    if ds.stage == 3:
        # ZeRO-3 allocates its gradient bucket up front at reduce_bucket_size elements (default 5e8: 2 GB in
        # fp32), more than a small model's gradients: per-worker memory then grew instead of shrinking.
        zero.update({"reduce_bucket_size": ZERO3_BUCKET, "stage3_prefetch_bucket_size": ZERO3_BUCKET})
    if ds.on_nvme and largest_shard:
        nvme_sizes(zero, largest_shard)
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


def nvme_sizes(zero: dict[str, Any], largest_shard: int) -> None:
    """Size NVMe offload to the model instead of DeepSpeed's defaults, made for billions of parameters.

    - `offload_param.max_in_cpu: 0`: by default DeepSpeed keeps up to 1e9 parameter elements in CPU
      memory and swaps them back from NVMe for good: any model under a billion parameters ended up
      offloaded to CPU memory, its swap files written once and never read.
    - `offload_param.buffer_size`: its 5 swap-in buffers default to 1e8 elements each (2 GB of fp32
      per worker, more than the 135M model); each holds one parameter's shard, so the largest shard.
    - `sub_group_size`: the optimizer steps one sub-group at a time, swapping in its fp32 weights,
      gradients and both Adam moments (4 buffers), and parameters swap out through a buffer that big;
      the default 1e9 elements makes the whole shard one sub-group, all in memory at once. A
      sub-group closes once it reaches the largest shard: buffers of at most twice that.
    """
    zero["sub_group_size"] = largest_shard
    if zero.get("offload_param", {}).get("device") == "nvme":
        zero["offload_param"].update({"max_in_cpu": 0, "buffer_size": largest_shard})
        zero.update({"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0})


def remove_swap_files(spec: JobSpec, rank: int) -> None:
    """Delete this worker's NVMe swap files once its run is over (they hold nothing a checkpoint or
    the export needs), then whatever folders of the job's that are left empty. Each worker removes
    only its own `rank<N>` folders: on a shared disk the others may still be writing theirs."""
    folder = nvme_folder(spec)
    if folder is None or not folder.is_dir():
        return
    for root, _, _ in os.walk(folder, topdown=False):  # deepest first; errors (a folder gone) ignored
        if Path(root).name == f"rank{rank}":
            shutil.rmtree(root, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.rmdir(root)
