"""The replica's prefill thread (`prefill_thread: true`, the default): arriving prompts are prefilled on
a second thread while the running rows decode, and join the batch at a later step, with the outputs
one-at-a-time generation gives. Rows whose forward cannot run beside another on the same model (a LoRA
pool's rows on PEFT's `adapter_names` path, which hooks the model for the call; prompt-learning rows)
are prefilled on the stepping thread instead."""

from __future__ import annotations

import pytest

from adapter_factory import llama_with_adapters, make_adapter
from onebase.serve.artifacts import inspect
from onebase.serve.engine import BaseEngine, Row

PROMPTS = ["Hello there", "The weather today is"]
METHODS = {"lora2": {"name": "lora", "r": 2}, "lora8": {"name": "lora", "r": 8}, "dora": {"name": "dora", "r": 4},
           "prefix": {"name": "prefix", "num_virtual_tokens": 4}}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return llama_with_adapters(tmp_path_factory.mktemp("prefill-thread"), METHODS, seed=400)


def test_arrivals_prefill_beside_the_decode_steps_with_one_at_a_time_outputs(made, tmp_path):
    base, exports = made
    engine = BaseEngine(str(base))
    loaded = {name: engine.load(name, inspect(path)) for name, path in exports.items()}
    rows = {"long": Row(loaded["lora2"], PROMPTS[0], max_tokens=20),
            "lora8": Row(loaded["lora8"], PROMPTS[1], max_tokens=6), "bare": Row(None, PROMPTS[1], max_tokens=6),
            "dora": Row(loaded["dora"], PROMPTS[0], max_tokens=6),
            "prefix": Row(loaded["prefix"], PROMPTS[1], max_tokens=6),
            "hooked": Row(loaded["lora8"], PROMPTS[0], max_tokens=6)}
    alone = {name: engine.generate([row])[0]["text"] for name, row in rows.items()}
    batcher = engine.batcher
    batcher.prefill_thread()

    long = batcher.submit(engine.sequence(rows["long"]))
    batcher.step()
    assert batcher.prefilling == [long] and not batcher.running()  # handed to the prefill thread
    batcher.step()  # nothing else to decode: the step waits for it; it joins and decodes once
    assert batcher.running() == 1 and len(long.tokens) == 2

    seqs = {"long": long, **{name: batcher.submit(engine.sequence(rows[name])) for name in ("lora8", "bare", "dora")}}
    batcher.step()
    # The pool's gathered rows (a LoRA adapter, the bare base) and a DoRA adapter (a model of its own).
    assert {id(s) for s in batcher.prefilling} == {id(seqs[name]) for name in ("lora8", "bare", "dora")}
    assert len(long.tokens) == 3  # decoded meanwhile
    # A hot load while that prefill may still run waits for it (the model changes under a load).
    extra = engine.load("extra", inspect(make_adapter(base, tmp_path / "extra", "causal-lm",
                                                      {"name": "lora", "r": 4}, seed=499)))
    gathered = loaded["lora8"].runner.gathered
    gathered.enabled = False  # the pool's rows take PEFT's hooked `adapter_names` path from here on
    seqs |= {name: batcher.submit(engine.sequence(rows[name])) for name in ("prefix", "hooked")}
    handed = set()
    while not all(s.done.is_set() for s in seqs.values()):
        batcher.step()
        handed |= {id(s) for s in batcher.prefilling}
    gathered.enabled = True
    assert not handed & {id(seqs["prefix"]), id(seqs["hooked"])}  # these prefilled on the stepping thread
    assert {name: seq.text for name, seq in seqs.items()} == alone
    assert not batcher.batches and not batcher.prefilling and not batcher.pending()
    assert engine.generate([Row(extra, PROMPTS[0], max_tokens=4)])[0]["text"]


def test_a_prefill_that_fails_on_its_thread_fails_its_rows_in_one_line_and_the_others_go_on(made):
    base, exports = made
    engine = BaseEngine(str(base))
    lora = engine.load("lora2", inspect(exports["lora2"]))
    expected = engine.generate([Row(lora, PROMPTS[0], max_tokens=12)])[0]["text"]
    batcher = engine.batcher
    batcher.prefill_thread()
    running = batcher.submit(engine.sequence(Row(lora, PROMPTS[0], max_tokens=12)))
    batcher.step()
    batcher.step()
    broken = engine.sequence(Row(lora, PROMPTS[1], max_tokens=4))
    broken.prompt = [engine.base.config.vocab_size + 7] * 3  # no such token: the embedding lookup fails
    batcher.submit(broken)
    while not (running.done.is_set() and broken.done.is_set()):
        batcher.step()
    assert broken.finish_reason == "error" and broken.error.startswith("generation failed: ")
    assert "\n" not in broken.error and "index out of range" in broken.error
    assert running.text == expected and running.finish_reason == "length"
    after = batcher.submit(engine.sequence(Row(lora, PROMPTS[1], max_tokens=4)))
    while not after.done.is_set():
        batcher.step()
    assert after.finish_reason in ("length", "stop") and not batcher.pending()
