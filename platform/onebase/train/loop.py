"""The per-worker training loop run by Ray Train: one recipe for every task and method.

Data path on each worker: rows -> tokens -> method-wrapped model -> DeepSpeed engine -> steps,
with periodic eval, MLflow metrics from rank 0, and checkpoints through `ray.train.report`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from onebase.data.mixture import source_names
from onebase.data.prepare import collate, tokenize
from onebase.manifest import MANIFEST, write_run_info
from onebase.methods import get_method
from onebase.methods.base import trainable_parameters
from onebase.model.build import load_model, load_tokenizer
from onebase.spec.schema import JobSpec
from onebase.train import zero3
from onebase.train.console import Reporter
from onebase.train.deepspeed_config import (
    deepspeed_config,
    nvme_folder,
    nvme_no_resume,
    remove_swap_files,
    resolve_precision,
)
from onebase.train.ds_ops import import_deepspeed, pin_ninja
from onebase.train.evaluate import evaluate
from onebase.train.memory import memory_per_worker, peak_rss_mb
from onebase.train.tracker import Relayed, Tracker
from onebase.train.zero3 import partitioned_loading, resident_param_bytes

STATE_FILE = "onebase_state.json"
EXPORT_DIR = "export"
RUN_INFO = MANIFEST  # onebase.json (onebase/manifest.py)
PROBE_FILE = "probe.safetensors"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec = JobSpec.model_validate(config["spec"])
    try:
        train_worker(config, spec)
    finally:  # NVMe offload: a finished or failed run leaves no swap files behind (a model's worth each)
        if spec.deepspeed.on_nvme:
            remove_swap_files(spec, ray.train.get_context().get_world_rank())


def train_worker(config: dict[str, Any], spec: JobSpec) -> None:
    pin_ninja()  # before DeepSpeed loads its cached shm_comm op
    startup = Startup(config.get("driver_started"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    board = config.get("progress_board")  # the driver's console; absent in sweep trials
    # Rank 0 logs to MLflow through the board when there is one (train/tracker.py); else it connects
    # itself (imports, opening the store: ~2 s) on a thread while the model loads.
    connecting = Tracker.connect(config) if rank == 0 and board is None else None
    import_deepspeed(without_mlflow=connecting is None)  # see there: MLflow only where this worker logs itself
    torch.set_num_threads(config["threads_per_worker"])
    device = ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")
    dataset = ray.get(config["data_ref"])
    startup.mark("setup")

    precision = resolve_precision(spec.deepspeed.precision, spec.scaling.use_gpu)
    # NVMe offload sizes its swap buffers by the largest parameter: known before the model is built.
    largest = (zero3.largest_shard(spec, config["model_path"], dataset.labels, world)
               if spec.deepspeed.on_nvme else None)
    ds_config = deepspeed_config(spec, precision, largest)
    # ZeRO-3: pretrained models are created partitioned (zero.Init); this must stay referenced while it is
    # built. Random init (smoke tests) stays whole, so the same seed rebuilds the same base on reload.
    partitioning = partitioned_loading(ds_config) if spec.model.init == "pretrained" else None
    tokenizer = load_tokenizer(config["model_path"], spec.model.revision)
    model = load_model(spec, config["model_path"], dataset.labels, tokenizer.pad_token_id)
    if partitioning is not None:
        zero3.keep_used_conversions(model)
    param_bytes = resident_param_bytes(model)
    base_print = zero3.fingerprint(model, rank)  # every rank: gathering is a collective under ZeRO-3
    model = get_method(spec.method.name).apply(model, spec.method, spec.task)
    trainable, total = trainable_parameters(model)
    startup.mark("model")

    train_loader, sampler = make_loader(spec, tokenizer, dataset.train, dataset.labels, rank, world, train=True)
    eval_loader, _ = make_loader(spec, tokenizer, dataset.validation, dataset.labels, rank, world, train=False)
    startup.mark("tokenize")
    accumulation = spec.deepspeed.gradient_accumulation_steps
    steps_per_epoch = max(1, len(train_loader) // accumulation)
    total_steps = spec.train.max_steps or math.ceil(spec.train.epochs * steps_per_epoch)

    engine = make_engine(spec, model, total_steps, ds_config)
    step = restore(engine, spec)
    startup.mark("engine")
    resumed = step > 0
    tracker = connecting.result() if connecting else Relayed(board) if rank == 0 else None
    if tracker and step > 0:
        tracker.metrics({"resumed_from_step": step}, step)
    if tracker and step == 0:
        tracker.params({"trainable_params": trainable, "total_params": total, "precision": precision,
                        "world_size": world, "total_steps": total_steps,
                        "partitioned_loading": partitioning is not None})
        # What this worker held right after loading: its shard under ZeRO-3, the whole model otherwise.
        tracker.metrics({"loaded_param_mb_per_worker": param_bytes / 2**20}, 0)
    startup.mark("tracking")  # waiting for the MLflow connection, then the run's first params
    num_labels = len(dataset.labels) if dataset.labels else None
    groups = source_names(dataset.validation)  # a mixture: metrics per source too
    reporter = Reporter(board, total_steps, spec.train.log_every_steps) if rank == 0 and board else None

    window = Window()
    train_seconds, train_samples, train_tokens = 0.0, 0, 0
    last_eval: dict[str, float] = {}
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        skip = (step - epoch * steps_per_epoch) * accumulation  # resume mid-epoch on the same order
        for micro, batch in enumerate(train_loader):
            if micro < skip:
                continue
            started = time.perf_counter()
            batch.pop("index")
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            elapsed = time.perf_counter() - started
            samples, tokens = batch["input_ids"].shape[0] * world, int(batch["attention_mask"].sum()) * world
            window.add(loss.detach().item(), samples, tokens, elapsed)
            if reporter:
                reporter.add(window.losses[-1], samples, tokens, elapsed)
            train_seconds, train_samples, train_tokens = (train_seconds + elapsed, train_samples + samples,
                                                          train_tokens + tokens)
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            maybe_fail(step, config, resumed)
            if tracker and startup.pending:
                tracker.metrics(startup.first_step(), step)
            if reporter:
                reporter.step(step, engine.get_lr()[0])
            if tracker and (step % spec.train.log_every_steps == 0 or step == total_steps):
                tracker.metrics({**window.summary(engine.get_lr()[0], step / steps_per_epoch),
                                 "peak_memory_mb": peak_memory_mb(device)}, step)
                window = Window()
            at_eval = spec.train.eval_every_steps and step % spec.train.eval_every_steps == 0
            if at_eval and step < total_steps:
                last_eval = evaluate(engine, eval_loader, spec.task, num_labels, device, groups)
                if tracker:
                    tracker.metrics(last_eval, step)
                if reporter:
                    reporter.evaluated(step, last_eval)
            at_checkpoint = (spec.checkpoint.every_steps and step % spec.checkpoint.every_steps == 0) or at_eval
            if at_checkpoint and step < total_steps:
                save_and_report(engine, step, {**last_eval, "step": step}, rank)
            if step >= total_steps:
                break

    final = evaluate(engine, eval_loader, spec.task, num_labels, device, groups)
    memory = memory_per_worker(engine, nvme_folder(spec))  # a collective: every rank
    probe = probe_outputs(engine, eval_loader, device)
    throughput = {"train_samples_per_s": train_samples / max(train_seconds, 1e-9),
                  "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9), "train_compute_s": train_seconds,
                  "peak_memory_mb": peak_memory_mb(device)}
    if tracker:
        tracker.metrics({**final, **throughput, **memory}, step)
        tracker.flush()  # before the last report: the driver logs what is relayed until training returns
    if reporter:
        reporter.evaluated(step, final, final=True)
    info = {"task": spec.task, "method": spec.method.name, "method_config": spec.method.model_dump(),
            "base_model": spec.model.name, "base_fingerprint": base_print, "labels": dataset.labels,
            "trainable_params": trainable, "total_params": total, "dataset_fingerprint": config["data_fingerprint"],
            "prompt": spec.prompt.model_dump() if spec.prompt else None, "precision": precision,
            "steps": step, "metrics": final}
    save_and_report(engine, step, {**final, **throughput, "step": step}, rank,
                    export=(spec, tokenizer, info, probe))


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPU; on CPU the worker process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def make_loader(spec: JobSpec, tokenizer, rows, labels, rank: int, world: int, train: bool):
    features = tokenize(spec, tokenizer, rows, labels)
    sampler = DistributedSampler(features, num_replicas=world, rank=rank, shuffle=train, seed=spec.train.seed,
                                 drop_last=False)
    batch_size = spec.train.batch_size if train else spec.train.eval_batch_size
    loader = DataLoader(features, batch_size=batch_size, sampler=sampler,
                        collate_fn=lambda f: collate(f, tokenizer.pad_token_id))
    return loader, sampler


def make_engine(spec: JobSpec, model, total_steps: int, ds_config: dict[str, Any]):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.train.learning_rate, weight_decay=spec.train.weight_decay)
    warmup = int(spec.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, spec.train.lr_scheduler))
    zero3.honor_init_dtype()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def restore(engine, spec: JobSpec) -> int:
    """Load the last Ray Train checkpoint (worker restart or `onebase run --resume`); returns its step."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    if nvme_no_resume(spec):  # a worker restart: fail in one line, not train on from wrong optimizer states
        raise RuntimeError(nvme_no_resume(spec))
    with checkpoint.as_directory() as path:
        engine.load_checkpoint(path, tag="ds")
        return json.loads((Path(path) / STATE_FILE).read_text())["step"]


def save_and_report(engine, step: int, metrics: dict[str, float], rank: int, export=None) -> None:
    """Every rank writes its DeepSpeed shard; Ray Train merges them into one checkpoint directory."""
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ds")
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps({"step": step}))
        if export is not None:
            export_trained(engine, Path(tmp) / EXPORT_DIR, rank, *export)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def export_trained(engine, out_dir: Path, rank: int, spec: JobSpec, tokenizer, info: dict,
                   probe: dict[str, torch.Tensor]) -> None:
    """Gather what the method writes (a collective under ZeRO-3: the whole model for a full fine-tune,
    the trained tensors alone for an adapter) to rank 0, and let the method write its export."""
    is_adapter = get_method(spec.method.name).is_adapter
    if engine.zero_optimization_partition_weights():
        state_dict = (zero3.trainable_state_dict(engine.module, rank) if is_adapter
                      else engine._zero3_consolidated_16bit_state_dict())
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    # PEFT's prompt learning re-runs its prompt encoder to save it: it needs the full weights.
    with gathered_trainable(engine, is_adapter):
        if rank == 0:
            out_dir.mkdir(parents=True)
            get_method(spec.method.name).export(engine.module, state_dict, out_dir)
    if rank != 0:
        return
    tokenizer.save_pretrained(out_dir)
    write_run_info(out_dir, info)
    save_file(probe, str(out_dir.parent / PROBE_FILE))


def gathered_trainable(engine, is_adapter: bool):
    """Under ZeRO-3, an adapter's trained parameters in full on every rank (a collective); else a no-op."""
    import contextlib

    if not (is_adapter and engine.zero_optimization_partition_weights()):
        return contextlib.nullcontext()
    import deepspeed

    trained = [p for p in engine.module.parameters() if p.requires_grad]
    return deepspeed.zero.GatheredParameters(trained, modifier_rank=None)


@torch.no_grad()
def probe_outputs(engine, loader, device: torch.device, rows: int = 4, vocab: int = 1024) -> dict[str, torch.Tensor]:
    """Outputs of the trained model on a few validation rows, kept so an export can be checked
    against them after reloading (plain PEFT / from_pretrained must reproduce them)."""
    engine.eval()
    batch = next(iter(loader))
    inputs = {k: batch[k][:rows].to(device) for k in ("input_ids", "attention_mask")}
    out = engine(**inputs)
    logits = out.logits if hasattr(out, "logits") else torch.stack([out.start_logits, out.end_logits], -1)
    engine.train()
    return {**{k: v.cpu() for k, v in inputs.items()}, "logits": logits[..., :vocab].float().cpu().contiguous()}


def maybe_fail(step: int, config: dict[str, Any], resumed: bool) -> None:
    """Fault injection for recovery drills: ONEBASE_FAIL_AT_STEP (read by the driver) crashes rank 0
    at that step, unless this attempt started from a checkpoint."""
    fail_at = config.get("fail_at_step")
    if fail_at and step == int(fail_at) and not resumed and ray.train.get_context().get_world_rank() == 0:
        raise RuntimeError(f"injected failure at step {step} (ONEBASE_FAIL_AT_STEP)")


class Startup:
    """Where a run's start-up time goes, from this worker's side (seconds, logged at the first step):
    set-up (importing DeepSpeed, the data from the object store), model load, tokenisation, DeepSpeed
    engine (process group, shm_comm op), tracking (what of the MLflow connection the model load did not
    hide, the first params; nothing to wait for when rank 0 relays through the driver's board), and the
    whole way from the driver's command to the first step."""

    def __init__(self, driver_started: float | None) -> None:
        self.driver_started, self.last, self.pending = driver_started, time.time(), True
        self.worker_began = self.last
        self.marks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.time()
        self.marks[f"startup_{phase}_s"], self.last = now - self.last, now

    def first_step(self) -> dict[str, float]:
        self.pending = False
        now = time.time()
        out = {**self.marks, "startup_worker_s": now - self.worker_began}
        if self.driver_started:
            out["startup_to_first_step_s"] = now - self.driver_started
        return out


class Window:
    """Loss and throughput since the last log line."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.samples = self.tokens = 0
        self.seconds = 0.0

    def add(self, loss: float, samples: int, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.samples, self.tokens, self.seconds = self.samples + samples, self.tokens + tokens, self.seconds + seconds

    def summary(self, lr: float, epoch: float) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {"loss": sum(self.losses) / max(len(self.losses), 1), "lr": lr, "epoch": epoch,
                "tokens_per_s": self.tokens / seconds, "samples_per_s": self.samples / seconds}
