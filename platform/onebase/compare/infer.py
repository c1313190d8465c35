"""Inference cost of a trained classifier, measured like a prompt row's: the best export loaded on
a fresh base in a Ray task (one thread, as each prompt actor has), the evaluation rows forwarded at the
prompt rows' batch size, ms and input tokens per query."""

from __future__ import annotations

from typing import Any


def measure(job_json: dict[str, Any], model_path: str, export_dir: str, texts: list[str],
            labels: list[str] | None, batch_size: int) -> dict[str, float]:
    import time

    import torch

    from onebase.methods import load_trained
    from onebase.model.build import load_model, load_tokenizer
    from onebase.spec.schema import JobSpec

    torch.set_num_threads(1)
    spec = JobSpec.model_validate(job_json)
    tokenizer = load_tokenizer(model_path)
    model = load_trained(load_model(spec, model_path, labels, tokenizer.pad_token_id), export_dir).eval()
    tokens, started = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i: i + batch_size], truncation=True, max_length=spec.data.max_length,
                              padding=True, return_tensors="pt")
            tokens += int(batch["attention_mask"].sum())
            model(**batch)
    seconds = time.perf_counter() - started
    n = max(len(texts), 1)
    return {"ms_per_query": 1000 * seconds / n, "prompt_tokens_per_query": tokens / n}


def measure_on_ray(job_json: dict[str, Any], model_path: str, export_dir: str, texts: list[str],
                   labels: list[str] | None, batch_size: int) -> dict[str, float]:
    import ray

    return ray.get(ray.remote(num_cpus=1)(measure).remote(job_json, model_path, export_dir, texts, labels,
                                                          batch_size))
