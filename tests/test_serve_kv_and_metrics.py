"""A replica's KV-cache budget, and its per-adapter figures as Prometheus reads them.

`limits.kv_cache_tokens` bounds the KV-cache positions a replica's running rows may hold: each
request reserves prompt + max_tokens positions at admission, rows of a batch are padded to its
longest reservation, and a request that does not fit waits in the queue (FIFO) for rows to leave.
The engine test checks the bookkeeping in-process; the live tests run the real Ray Serve app on
127.0.0.1 with a small budget, and scrape Ray's Prometheus export of every node for the metrics
the replicas record per adapter (`serve/stats.py`).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import requests

from adapter_factory import make_adapter, tiny_base
from onebase.serve.client import Client
from onebase.serve.engine import BaseEngine, Row
from onebase.serve.kv_budget import KvBudget

ADMIN = {"Authorization": "Bearer admin-secret"}
BUDGET = 96  # KV-cache positions per replica: room for two of the requests below at once, not three
# (prompt, max_tokens): reservations of 32-44 positions with these prompts on SmolLM2's tokenizer
REQUESTS = [("Hello there", 30), ("The weather today is", 36), ("Once upon a time", 40),
            ("A list of colours:", 32), ("Dear diary,", 34), ("Hi", 38)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("kv-bases"), "llama")


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("kv-adapters")
    return [make_adapter(base, root / f"lora{i}", "causal-lm", {"name": "lora", "r": 4}, seed=300 + i)
            for i in range(2)]


@pytest.fixture(scope="module")
def expected(base, loras) -> list[dict]:
    """Each request's greedy answer from the engine with no budget: every row admitted at once."""
    from onebase.serve.artifacts import inspect

    engine = BaseEngine(str(base))
    adapters = [engine.load(f"a{i}", inspect(path)) for i, path in enumerate(loras)]
    rows = [Row(([None] + adapters)[i % 3], prompt, max_tokens=n) for i, (prompt, n) in enumerate(REQUESTS)]
    results = engine.generate(rows)
    kv = engine.batcher.kv.summary()
    assert not kv["waited"] and kv["peak_held"] > BUDGET  # no budget: nothing waited, the cache grew past it
    return results


def test_with_a_kv_budget_rows_wait_their_turn_and_answer_the_same(base, loras, expected):
    from onebase.serve.artifacts import inspect

    engine = BaseEngine(str(base))
    adapters = [engine.load(f"a{i}", inspect(path)) for i, path in enumerate(loras)]
    engine.batcher.kv = KvBudget(BUDGET)
    rows = [Row(([None] + adapters)[i % 3], prompt, max_tokens=n) for i, (prompt, n) in enumerate(REQUESTS)]
    got = engine.generate(rows)
    assert [g["text"] for g in got] == [e["text"] for e in expected]
    assert [g["completion_tokens"] for g in got] == [e["completion_tokens"] for e in expected]
    kv = engine.batcher.kv.summary()
    # Rows waited for room, and neither the reservations nor the cache tensors ever went past it.
    assert kv["waited"] >= 3 and 0 < kv["peak_held"] <= kv["peak_reserved"] <= BUDGET
    assert kv["reserved"] == kv["held"] == 0  # all done: everything was given back
    # A request that cannot fit even alone ends at once with the reason; the others are unaffected.
    too_long, fine = engine.generate([Row(adapters[0], "Hello there", max_tokens=BUDGET), rows[1]])
    assert too_long["error"].startswith("prompt (")
    assert f"at most {BUDGET} (limits.kv_cache_tokens)" in too_long["error"]
    assert fine["text"] == expected[1]["text"]


# ---- the live server -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(serve_http, base, loras, tmp_path_factory):
    from ray import serve

    from onebase.serve.app import build

    root = tmp_path_factory.mktemp("kv-serving")
    # An idle replica waits 300 ms for a burst: the concurrent requests arrive before the first prefill.
    args = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "bases": [{"name": str(base), "alias": "lm", "cpus": 0.25, "max_adapters": 8, "max_batch_size": 8,
                       "batch_wait_ms": 300}],
            "adapters": [{"id": "a", "source": str(loras[0])}, {"id": "b", "source": str(loras[1])},
                         # the metrics test's own: no other test sends them requests
                         {"id": "metrics-a", "source": str(loras[0])}, {"id": "metrics-b", "source": str(loras[1])}],
            "auth": {"admin_token": "admin-secret"},
            "limits": {"max_prompt_tokens": 32, "max_tokens": 256, "kv_cache_tokens": BUDGET}}
    serve.run(build(args), name="onebase-kv", route_prefix="/", blocking=False)
    Client(serve_http).wait_ready(180)
    yield serve_http
    serve.delete("onebase-kv")


def complete(url: str, model: str, prompt: str, max_tokens: int) -> requests.Response:
    return requests.post(f"{url}/v1/completions", timeout=120,
                         json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def kv_figures(url: str) -> dict:
    return requests.get(f"{url}/admin/adapters", headers=ADMIN, timeout=60).json()["decoding_on_a_replica"]["lm"]["kv"]


@pytest.mark.slow
def test_concurrent_requests_under_a_small_kv_budget_all_answer_as_without_one(server, expected):
    models = ["lm", "a", "b"]
    answers: dict[int, requests.Response] = {}
    threads = [threading.Thread(target=lambda i=i, p=p, n=n: answers.update({i: complete(server, models[i % 3], p, n)}))
               for i, (p, n) in enumerate(REQUESTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert all(answers[i].status_code == 200 for i in range(len(REQUESTS))), [a.text for a in answers.values()]
    texts = [answers[i].json()["choices"][0]["text"] for i in range(len(REQUESTS))]
    assert texts == [e["text"] for e in expected]
    kv = kv_figures(server)
    assert kv["budget"] == BUDGET and kv["waited"] >= 1  # the budget held requests back...
    assert 0 < kv["peak_held"] <= kv["peak_reserved"] <= BUDGET  # ...and was never exceeded


@pytest.mark.slow
def test_a_prompt_starting_like_an_earlier_one_reuses_its_kv_and_answers_the_same(server, base, loras):
    """The replica's prefix cache is on by default (limits.prefix_cache_tokens)."""
    from onebase.serve.artifacts import inspect

    shared = "You are a careful assistant. Answer briefly and politely.\n"

    def figures() -> dict:
        return requests.get(f"{server}/admin/adapters", headers=ADMIN, timeout=60).json()[
            "decoding_on_a_replica"]["lm"]["prefix_cache"]

    assert complete(server, "b", shared + "Q: Name a colour.", 6).status_code == 200
    before = figures()
    second = complete(server, "b", shared + "Q: Count to three.", 6)
    after = figures()
    assert after["max_tokens"] == 2048 and after["hits"] == before["hits"] + 1
    assert after["reused_tokens"] - before["reused_tokens"] >= 8  # the shared instruction, not prefilled again
    engine = BaseEngine(str(base))  # no prefix cache
    want = engine.generate([Row(engine.load("b", inspect(loras[1])), shared + "Q: Count to three.", max_tokens=6)])
    assert second.json()["choices"][0]["text"] == want[0]["text"]


@pytest.mark.slow
def test_a_request_that_can_never_fit_the_kv_budget_is_a_400_with_one_line(server):
    refused = complete(server, "a", "Hello there", BUDGET)  # max_tokens alone fills the budget
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    found = re.fullmatch(rf"prompt \((\d+) tokens\) \+ max_tokens \({BUDGET}\) need (\d+) KV-cache positions; "
                         rf"a replica holds at most {BUDGET} \(limits.kv_cache_tokens\)", message)
    assert found and int(found[2]) == int(found[1]) + BUDGET, message
    assert complete(server, "a", "Hello there", 4).status_code == 200  # serving goes on


# ---- Prometheus --------------------------------------------------------------------------------

def scrape() -> dict[str, list]:
    """Every node's Prometheus export (Ray's metrics agent), parsed: metric family name -> samples."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, list] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
            families.setdefault(family.name, []).extend(family.samples)
    return families


def total(families: dict[str, list], sample: str, **labels: str) -> float:
    """The sum of a sample over every series with these labels (replicas, workers)."""
    return sum(s.value for samples in families.values() for s in samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.slow
def test_per_adapter_metrics_reach_a_prometheus_scrape(server):
    sent = {"metrics-a": (3, 0), "metrics-b": (3, 1)}  # requests, of which refused
    for model, (count, refused) in sent.items():
        for i in range(count - refused):
            assert complete(server, model, "Hello there", 2 + i).status_code == 200
        for _ in range(refused):  # a request over the KV budget: refused on the replica, counted as an error
            assert complete(server, model, "Hello there", BUDGET).status_code == 400
    resident = len(requests.get(f"{server}/admin/adapters", headers=ADMIN, timeout=60).json()
                   ["resident_on_a_replica"]["lm"])
    tags = {"base": "lm", "application": "onebase-kv", "deployment": "base-lm"}

    def figures(families) -> dict:
        return {model: {"requests": total(families, "ray_onebase_requests_total", model=model, **tags),
                        "errors": total(families, "ray_onebase_request_errors_total", model=model, **tags),
                        "latencies": total(families, "ray_onebase_request_latency_ms_count", model=model, **tags),
                        "lookups": total(families, "ray_onebase_adapter_cache_hits_total", model=model, **tags)
                        + total(families, "ray_onebase_adapter_cache_misses_total", model=model, **tags)}
                for model in sent}

    want = {model: {"requests": count, "errors": refused, "latencies": count, "lookups": count}
            for model, (count, refused) in sent.items()}
    deadline, got = time.time() + 90, None  # Ray's agent exports what replicas record every few seconds
    while time.time() < deadline:
        families = scrape()
        got = figures(families)
        if got == want and total(families, "ray_onebase_resident_adapters", **tags) == resident:
            break
        time.sleep(2)
    assert got == want
    assert total(families, "ray_onebase_resident_adapters", **tags) == resident == 4
    assert total(families, "ray_onebase_request_latency_ms_sum", model="metrics-a", **tags) > 0
