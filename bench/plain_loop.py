"""A plain single-process PyTorch + PEFT training loop: the baseline `onebase run` is measured against.

Same rows, tokenization, batch size, optimizer and thread count as the onebase job it mirrors.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader


def plain_train(spec_path: str, threads: int, max_steps: int | None = None) -> dict[str, float]:
    from onebase.data.prepare import collate, tokenize
    from onebase.data.sources import load_dataset
    from onebase.methods import get_method
    from onebase.model.assets import resolve_model
    from onebase.model.build import load_model, load_tokenizer
    from onebase.spec import load_spec

    torch.set_num_threads(threads)
    spec = load_spec(spec_path)
    data = load_dataset(spec)
    path = resolve_model(spec.model.name)
    tokenizer = load_tokenizer(path)
    model = get_method(spec.method.name).apply(load_model(spec, path, data.labels, tokenizer.pad_token_id),
                                               spec.method, spec.task)
    features = tokenize(spec, tokenizer, data.train, data.labels)
    generator = torch.Generator().manual_seed(spec.train.seed)
    loader = DataLoader(features, batch_size=spec.train.batch_size, shuffle=True, generator=generator,
                        collate_fn=lambda f: collate(f, tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.train.learning_rate)
    total = max_steps or int(spec.train.epochs * len(loader))
    model.train()
    step, samples, seconds = 0, 0, 0.0
    while step < total:
        for batch in loader:
            batch.pop("index")
            started = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - started
            samples += batch["input_ids"].shape[0]
            step += 1
            if step >= total:
                break
    return {"samples_per_s": samples / seconds, "steps": step, "compute_s": seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-steps", type=int)
    args = parser.parse_args()
    print(json.dumps(plain_train(args.spec, args.threads, args.max_steps)))
