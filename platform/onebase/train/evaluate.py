"""Evaluation on each worker's shard; predictions are gathered so every rank sees the same metrics."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from onebase.data.prepare import IGNORE
from onebase.tasks import TASKS


@torch.no_grad()
def evaluate(engine, loader, task: str, num_labels: int | None, device: torch.device,
             groups: list[str] | None = None) -> dict[str, float]:
    """Metrics over the loader's rows; with `groups` (a name per row, e.g. its mixture source) also
    `mixture/<name>/<metric>` over each group's rows, from the same forward passes."""
    engine.eval()
    records: list[tuple[int, dict[str, Any]]] = []
    for batch in loader:
        index = batch.pop("index").tolist()
        batch = {k: v.to(device) for k, v in batch.items()}
        out = engine(**batch)
        records += list(zip(index, per_sample(task, batch, out)))
    engine.train()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    samples = [s for _, s in sorted(dict(records).items())]  # the sampler pads shards: dedupe by index
    metrics = summarise(task, samples, num_labels)
    for name in sorted(set(groups or [])):
        part = [s for s, g in zip(samples, groups or []) if g == name]
        metrics.update({f"mixture/{name}/{k}": v for k, v in summarise(task, part, num_labels).items()})
    return metrics


def per_sample(task: str, batch: dict[str, torch.Tensor], out) -> list[dict[str, Any]]:
    scoring = TASKS[task].scoring  # how this task is scored: the task table
    if scoring == "label":
        loss = F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")
        return [{"pred": [p], "gold": [g], "loss": ls, "n": 1}
                for p, g, ls in zip(out.logits.argmax(-1).tolist(), batch["labels"].tolist(), loss.tolist())]
    if scoring == "span":
        starts, ends = out.start_logits.argmax(-1).tolist(), out.end_logits.argmax(-1).tolist()
        gold = zip(batch["start_positions"].tolist(), batch["end_positions"].tolist())
        return [{"span": (s, e), "gold_span": g, "loss": float(out.loss), "n": 1}
                for s, e, g in zip(starts, ends, gold)]
    # Per position (token classification) and next token (causal LM): where labels are not ignored.
    logits, labels = out.logits.float(), batch["labels"]
    logits = logits[:, logits.shape[1] - labels.shape[1]:]  # drop soft-prompt positions (prompt tuning)
    if scoring == "next-token":
        logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=IGNORE)
    preds, mask = logits.argmax(-1), labels != IGNORE
    samples = []
    for i in range(labels.shape[0]):
        m = mask[i]
        samples.append({"pred": preds[i][m].tolist(), "gold": labels[i][m].tolist(),
                        "loss": float(token_loss[i][m].sum()), "n": int(m.sum())})
    return samples


def summarise(task: str, samples: list[dict[str, Any]], num_labels: int | None) -> dict[str, float]:
    tokens = sum(s["n"] for s in samples)
    loss = sum(s["loss"] for s in samples) / max(tokens, 1)
    metrics = {"eval_loss": loss, "eval_samples": float(len(samples))}
    scoring = TASKS[task].scoring
    if scoring == "span":
        metrics["exact_match"] = sum(s["span"] == tuple(s["gold_span"]) for s in samples) / len(samples)
        metrics["eval_loss"] = sum(s["loss"] for s in samples) / len(samples)
        return metrics
    if scoring == "next-token":
        metrics["perplexity"] = math.exp(min(loss, 50.0))
        # Teacher-forced argmax equal to every response token (EOS included) is exactly what greedy
        # decoding would produce, so this is the exact match of the generated answer.
        if num_labels:  # a label set: answers are short and exact match is meaningful
            metrics["exact_match"] = sum(s["pred"] == s["gold"] for s in samples) / len(samples)
        return metrics
    from sklearn.metrics import f1_score  # here: ~0.5 s of imports off every worker's way to its first step

    preds = [p for s in samples for p in s["pred"]]
    gold = [g for s in samples for g in s["gold"]]
    metrics["accuracy"] = sum(p == g for p, g in zip(preds, gold)) / max(len(gold), 1)
    metrics["macro_f1"] = float(f1_score(gold, preds, labels=list(range(num_labels or 0)) or None,
                                         average="macro", zero_division=0))
    return metrics
