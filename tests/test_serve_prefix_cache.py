"""Prompts that start like an earlier prompt on the same adapter reuse its KV instead of prefilling it.

The reference is the same engine with the prefix cache off. Tolerance: greedy token ids identical,
each chosen token's logprob within 1e-4 (the reused keys and values were computed in another batch:
float summation order only).
"""

from __future__ import annotations

import pytest

from adapter_factory import make_adapter, tiny_base
from onebase.serve.artifacts import inspect
from onebase.serve.engine import BaseEngine, Row
from onebase.serve.prefix_cache import PrefixCache

SYSTEM = "You are a careful assistant. Answer briefly and stay polite to every user you meet.\n"
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Count to three.", "Why is the sky blue today?"]
NEW = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-cache")
    base = tiny_base(root, "llama")
    loras = [make_adapter(base, root / f"lora{i}", "causal-lm", {"name": "lora", "r": 4}, seed=500 + i)
             for i in range(2)]
    return base, loras


def engine_with(base, loras, cache_tokens: int):
    engine = BaseEngine(str(base))
    adapters = [engine.load(f"a{i}", inspect(path)) for i, path in enumerate(loras)]
    engine.batcher.prefix = PrefixCache(cache_tokens)
    return engine, adapters


def answers(engine, rows: list[Row]) -> list[dict]:
    return engine.generate([Row(r.adapter, r.text, max_tokens=NEW, logprobs=0) for r in rows])


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [g["text"] for g in got] == [w["text"] for w in want]
    for g, w in zip(got, want):
        assert [e["token"] for e in g["logprobs"]] == [e["token"] for e in w["logprobs"]]
        assert max((abs(a["logprob"] - b["logprob"]) for a, b in zip(g["logprobs"], w["logprobs"])),
                   default=0) < 1e-4


def test_prompts_sharing_a_system_turn_reuse_its_kv_per_adapter_and_answer_the_same(setup):
    base, loras = setup
    plain, plain_adapters = engine_with(base, loras, 0)
    cached, adapters = engine_with(base, loras, 4096)

    def rows(engine_adapters):
        a, b = engine_adapters
        # First one request per adapter (kept: LoRA changes the keys and values, so each adapter has its
        # own), then a group: three rows sharing the system turn with them and one short bare-base row.
        return [[Row(a, SYSTEM + QUESTIONS[0])], [Row(b, SYSTEM + QUESTIONS[0])],
                [Row(a, SYSTEM + QUESTIONS[1]), Row(b, SYSTEM + QUESTIONS[2]), Row(a, SYSTEM + QUESTIONS[3]),
                 Row(None, "Hi")]]

    for plain_group, cached_group in zip(rows(plain_adapters), rows(adapters)):
        assert_same(answers(cached, cached_group), answers(plain, plain_group))
    figures = cached.batcher.prefix.summary()
    system = len(cached.tokenizer(SYSTEM)["input_ids"])
    # The group's three rows reused (at least) the system turn; the first two and the bare row did not.
    assert figures["hits"] == 3 and figures["reused_tokens"] >= 3 * (system - 2)
    assert figures["misses"] == 3
    assert figures["prompts"] >= 4 and figures["held_tokens"] <= 4096
    assert plain.batcher.prefix.summary()["hits"] == 0

    # The same prompt again reuses all of it but the last token.
    prompt = SYSTEM + QUESTIONS[2]
    assert_same(answers(cached, [Row(adapters[1], prompt)]), answers(plain, [Row(plain_adapters[1], prompt)]))
    after = cached.batcher.prefix.summary()
    assert after["hits"] == 4
    assert after["reused_tokens"] - figures["reused_tokens"] == len(cached.tokenizer(prompt)["input_ids"]) - 1


def test_a_chat_turn_reuses_the_whole_earlier_conversation(setup):
    base, loras = setup
    plain, plain_adapters = engine_with(base, loras, 0)
    cached, adapters = engine_with(base, loras, 4096)
    first = SYSTEM + "user: " + QUESTIONS[0] + "\nassistant:"
    reply = answers(cached, [Row(adapters[0], first)])[0]["text"]
    second = first + reply + "\nuser: " + QUESTIONS[1] + "\nassistant:"
    before = cached.batcher.prefix.summary()["reused_tokens"]
    assert_same(answers(cached, [Row(adapters[0], second)]), answers(plain, [Row(plain_adapters[0], second)]))
    reused = cached.batcher.prefix.summary()["reused_tokens"] - before
    assert reused >= len(cached.tokenizer(first)["input_ids"]) - 1  # the whole first turn, at least


def test_the_cache_stays_within_its_budget_and_forgets_an_unloaded_adapter(setup):
    base, loras = setup
    cached, adapters = engine_with(base, loras, 64)
    for question in QUESTIONS:
        answers(cached, [Row(adapters[0], SYSTEM + question), Row(adapters[1], question * 3)])
        assert cached.batcher.prefix.summary()["held_tokens"] <= 64
    owners = {entry.owner[1] for entry in cached.batcher.prefix.entries.values()}
    assert adapters[0].key in owners
    cached.unload(adapters[0])
    assert adapters[0].key not in {entry.owner[1] for entry in cached.batcher.prefix.entries.values()}


def test_a_long_prompt_with_nothing_kept_does_not_cost_the_others_their_reuse(setup):
    """One forward gives its rows the same reused columns, so a long fresh prompt would make the whole
    group compute everything: such arrivals are prefilled apart, and still answer the same."""
    base, loras = setup
    plain, plain_adapters = engine_with(base, loras, 0)
    cached, adapters = engine_with(base, loras, 4096)
    system = SYSTEM * 3
    fresh = " ".join(QUESTIONS) * 3  # on the other adapter, longer than the reusing prompt, nothing kept

    def rows(engine_adapters):
        a, b = engine_adapters
        return [[Row(a, system + QUESTIONS[0])], [Row(a, system + QUESTIONS[1]), Row(b, fresh)]]

    for plain_group, cached_group in zip(rows(plain_adapters), rows(adapters)):
        assert_same(answers(cached, cached_group), answers(plain, plain_group))
    figures = cached.batcher.prefix.summary()
    kept = len(cached.tokenizer(system)["input_ids"])
    assert len(cached.tokenizer(fresh)["input_ids"]) > len(cached.tokenizer(system + QUESTIONS[1])["input_ids"])
    assert figures["hits"] == 1 and figures["reused_tokens"] >= kept - 2
