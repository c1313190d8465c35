"""What each worker holds: model states (parameters + optimizer states, as DeepSpeed keeps them) and
peak resident memory, gathered to rank 0 for MLflow. The figures ZeRO stages are compared by."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from onebase.train.zero3 import resident_param_bytes


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def optimizer_state_bytes(engine) -> int:
    """The wrapped torch optimizer's states plus DeepSpeed's fp32 master partitions (ZeRO-1/2/3 keep
    them apart from the module's parameters); under ZeRO-0 the optimizer works on the module itself."""
    module_params = {p.data_ptr() for p in engine.module.parameters() if p.numel()}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    total = 0
    for group in inner.param_groups:
        for param in group["params"]:
            if param.data_ptr() not in module_params:  # a master copy DeepSpeed made
                total += tensor_bytes(param)
    for state in inner.state.values():
        total += sum(tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def swap_bytes(folder: Path, rank: int) -> int:
    """Bytes of this worker's NVMe swap files: DeepSpeed keeps them in `rank<N>` folders."""
    return sum(f.stat().st_size for d in folder.rglob(f"rank{rank}") for f in d.iterdir() if f.is_file())


def worker_memory(engine, swap_folder: Path | None = None) -> dict[str, float]:
    """This worker's figures, in MiB; with NVMe offload also what it swapped out (`nvme_swap_mb`):
    parameters and optimizer states that were on disk, not in memory, counted in neither of the first."""
    params = resident_param_bytes(engine.module)
    optimizer = optimizer_state_bytes(engine)
    figures = {"param_mb": params / 2**20, "optimizer_state_mb": optimizer / 2**20,
               "model_state_mb": (params + optimizer) / 2**20, "peak_rss_mb": peak_rss_mb()}
    if swap_folder is not None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        figures["nvme_swap_mb"] = swap_bytes(swap_folder, rank) / 2**20
    return figures


def memory_per_worker(engine, swap_folder: Path | None = None) -> dict[str, float]:
    """Every worker's figures on every rank (a collective): the largest worker's, named *_per_worker."""
    mine = worker_memory(engine, swap_folder)
    everyone = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    return {f"{key}_per_worker": max(w[key] for w in everyone) for key in mine}
