"""Prompt-learning adapters (prefix tuning, prompt tuning, P-tuning) are rows of the continuous batcher.

Their virtual tokens are computed once at load; a batch of prompts of different lengths is prefilled
once behind them and decoded from the KV cache. The reference is PEFT's own `generate`, one request
at a time. Tolerance: greedy token ids identical; each chosen token's logprob within 1e-4 of what
PEFT's full forward over prompt + tokens so far gives (float summation order only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter_factory import make_adapter, reference_model, tiny_base
from onebase.serve.artifacts import inspect
from onebase.serve.engine import BaseEngine, Row

METHODS = [{"name": "prefix", "num_virtual_tokens": 4}, {"name": "prompt", "num_virtual_tokens": 5},
           {"name": "ptuning", "num_virtual_tokens": 3}]
PROMPTS = ["Hello there", "The weather today is cold, so we", "a", "Once upon a time in a land"]
NEW = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-learning")
    base = tiny_base(root, "llama")
    exports = {m["name"]: make_adapter(base, root / m["name"], "causal-lm", m, seed=700 + i)
               for i, m in enumerate(METHODS)}
    engine = BaseEngine(str(base))
    loaded = {name: engine.load(name, inspect(path)) for name, path in exports.items()}
    references = {name: reference_model(base, path, "causal-lm", None) for name, path in exports.items()}
    return engine, loaded, references


def peft_generate(model, tokenizer, prompt: str) -> list[int]:
    """PEFT's generate, greedy, this prompt alone (up to EOS)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    return out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out


def peft_logprobs(model, tokenizer, prompt: str, tokens: list[int]) -> list[float]:
    """Each token's logprob from PEFT's own forward over the whole sequence (virtual tokens rebuilt)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"] + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].log_softmax(-1)
    start = logits.shape[0] - len(tokens) - 1
    return [float(logits[start + i, t]) for i, t in enumerate(tokens)]


@pytest.mark.parametrize("method", [m["name"] for m in METHODS])
def test_prompt_learning_rows_batch_from_the_cache_like_peft_generate(setup, method):
    engine, loaded, references = setup
    adapter, reference, tokenizer = loaded[method], references[method], engine.tokenizer
    virtual = adapter.runner.virtual
    assert virtual.count == {m["name"]: m["num_virtual_tokens"] for m in METHODS}[method]  # computed at load
    expected = [peft_generate(reference, tokenizer, p) for p in PROMPTS]
    bare = engine.generate([Row(None, p, max_tokens=NEW) for p in PROMPTS])
    assert [r["text"] for r in bare] != [tokenizer.decode(e, skip_special_tokens=True) for e in expected]

    # Every prompt in one batch, the last one joining after two steps of the others.
    batcher = engine.batcher
    seqs = [batcher.submit(engine.sequence(Row(adapter, p, max_tokens=NEW, logprobs=0))) for p in PROMPTS[:-1]]
    for _ in range(2):
        batcher.step()
    assert [len(s.tokens) for s in seqs] == [2] * len(seqs) and batcher.running() == len(seqs)
    seqs.append(batcher.submit(engine.sequence(Row(adapter, PROMPTS[-1], max_tokens=NEW, logprobs=0))))
    batcher.step()
    assert batcher.running() == len(PROMPTS) and len(batcher.batches) == 1  # one batch, one adapter
    while not all(s.done.is_set() for s in seqs):
        batcher.step()
    assert not batcher.batches  # every row left; their KV rows went with them
    for prompt, seq, want in zip(PROMPTS, seqs, expected):
        assert seq.tokens == want, prompt
        got = [e["logprob"] for e in seq.logprobs]
        assert torch.allclose(torch.tensor(got), torch.tensor(peft_logprobs(reference, tokenizer, prompt, want)),
                              atol=1e-4), prompt


def test_prompt_learning_rows_keep_stop_n_seed_and_cancellation(setup):
    engine, loaded, references = setup
    adapter, batcher = loaded["prompt"], engine.batcher
    text = engine.generate([Row(adapter, PROMPTS[1], max_tokens=NEW)])[0]["text"]
    cut = engine.generate([Row(adapter, PROMPTS[1], max_tokens=NEW, stop=(text[3:5],))])[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[:text.index(text[3:5])]
    sampled = [Row(adapter, PROMPTS[0], max_tokens=6, temperature=1.0, seed=seed) for seed in (1, 1, 2)]
    first, again, other = engine.generate(sampled)
    assert first["text"] == again["text"] and first != other
    # A cached row next to the old, recomputing way (what the benchmark compares) gives the same answer.
    batcher.recompute_prompts = True
    try:
        assert engine.generate([Row(loaded["prefix"], PROMPTS[1], max_tokens=NEW)])[0]["text"] == \
            engine.generate([Row(loaded["prefix"], PROMPTS[1], max_tokens=NEW)])[0]["text"]
        old = engine.generate([Row(loaded["prefix"], p, max_tokens=NEW) for p in PROMPTS])
    finally:
        batcher.recompute_prompts = False
    assert engine.generate([Row(loaded["prefix"], p, max_tokens=NEW) for p in PROMPTS]) == old
    long = batcher.submit(engine.sequence(Row(adapter, PROMPTS[0], max_tokens=NEW)))
    gone = batcher.submit(engine.sequence(Row(adapter, PROMPTS[1], max_tokens=NEW)))
    batcher.step()
    gone.cancelled = True
    batcher.step()
    assert gone.finish_reason == "cancelled" and batcher.running() == 1
    while not long.done.is_set():
        batcher.step()


def test_virtual_tokens_are_freed_on_unload(setup, tmp_path):
    engine, loaded, _ = setup
    path = loaded["ptuning"].info.path
    extra = engine.load("extra", inspect(Path(path)))
    runner = extra.runner
    assert runner.virtual is not None and runner is not loaded["ptuning"].runner
    engine.unload(extra)
    assert runner.virtual is None and extra.key not in engine.adapters
