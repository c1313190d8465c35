"""Serving: one frozen base, every adapter method on it, chosen per request; hot swap; refusals.

Engine tests run the serving engine in-process; the live tests run the real Ray Serve app on
127.0.0.1 and talk to it over HTTP with `requests` and the official `openai` client.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from adapter_factory import LABELS, make_adapter, reference_model, tiny_base
from onebase.serve.artifacts import AdapterError, inspect
from onebase.serve.engine import BaseEngine, Row

CLS_METHODS = [{"name": "lora", "r": 4, "target_modules": ["query", "value"]},
               {"name": "dora", "r": 4, "target_modules": ["query", "value"]}, {"name": "ia3"},
               {"name": "prefix", "num_virtual_tokens": 4}, {"name": "prompt", "num_virtual_tokens": 4},
               {"name": "ptuning", "num_virtual_tokens": 4}, {"name": "bitfit"}, {"name": "houlsby", "bottleneck": 8},
               {"name": "adapterbias"}]
# BitFit is refused on bias-free Llama bases; every other method generates.
LM_METHODS = [m if m["name"] not in ("lora", "dora") else {"name": m["name"], "r": 4}
              for m in CLS_METHODS if m["name"] != "bitfit"]
TEXTS = ["I love this", "this is terrible, honestly the worst day", "meh"]
PROMPTS = ["Hello there", "The weather today is"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"bert": tiny_base(root, "bert"), "llama": tiny_base(root, "llama")}


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    made = {}
    for i, method in enumerate(CLS_METHODS):
        made[f"cls-{method['name']}"] = make_adapter(bases["bert"], root / f"cls-{method['name']}",
                                                     "sequence-classification", method, seed=i)
    for i, method in enumerate(LM_METHODS):
        made[f"lm-{method['name']}"] = make_adapter(bases["llama"], root / f"lm-{method['name']}", "causal-lm",
                                                    method, seed=100 + i)
    return made


def greedy_texts(model, tokenizer, prompts: list[str], new_tokens: int) -> list[str]:
    """What a plain, one-prompt-at-a-time greedy generate answers (up to EOS)."""
    texts = []
    for prompt in prompts:
        enc = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
        if tokenizer.eos_token_id in out:
            out = out[: out.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(out, skip_special_tokens=True))
    return texts


def probabilities(results) -> torch.Tensor:
    return torch.tensor([[r["probabilities"][label] for label in LABELS] for r in results])


def test_every_method_classifies_on_one_shared_base_like_a_fresh_model(bases, adapters):
    engine = BaseEngine(str(bases["bert"]))
    base_bytes = {name: t.data_ptr() for name, t in engine.tensors.items()}
    loaded = {m["name"]: engine.load(m["name"], inspect(adapters[f"cls-{m['name']}"])) for m in CLS_METHODS}
    enc = engine.tokenizer(TEXTS, padding=True, return_tensors="pt")
    singles = {}
    for name, adapter in loaded.items():
        reference = reference_model(bases["bert"], adapters[f"cls-{name}"], "sequence-classification")
        with torch.no_grad():
            expected = reference(**enc).logits.softmax(-1)
        singles[name] = probabilities(engine.classify([Row(adapter, t) for t in TEXTS]))
        assert torch.allclose(singles[name], expected, atol=1e-5), name
    # Adapters change the answer: no two methods give the same probabilities.
    assert len({tuple(p.flatten().round(decimals=4).tolist()) for p in singles.values()}) == len(singles)
    # One mixed batch over every adapter gives each row what it got alone.
    mixed = engine.classify([Row(loaded[name], t) for name in loaded for t in TEXTS])
    for k, name in enumerate(loaded):
        assert torch.allclose(probabilities(mixed[3 * k: 3 * k + 3]), singles[name], atol=1e-5), name
    # The base's tensors were never copied or written (BitFit's biases live in its own view).
    assert {name: t.data_ptr() for name, t in engine.tensors.items()} == base_bytes
    assert engine.fingerprint == BaseEngine(str(bases["bert"])).fingerprint


def test_every_method_generates_on_one_shared_base_like_a_fresh_model(bases, adapters):
    engine = BaseEngine(str(bases["llama"]))
    tokenizer = engine.tokenizer
    bare_before = engine.generate([Row(None, p, max_tokens=8, temperature=0) for p in PROMPTS])
    loaded = {}
    for method in LM_METHODS:
        name = method["name"]
        loaded[name] = engine.load(name, inspect(adapters[f"lm-{name}"]))
        reference = reference_model(bases["llama"], adapters[f"lm-{name}"], "causal-lm", None)
        got = engine.generate([Row(loaded[name], p, max_tokens=8) for p in PROMPTS])
        assert [g["text"] for g in got] == greedy_texts(reference, tokenizer, PROMPTS, 8), name
    everything = [Row(loaded[m["name"]], p, max_tokens=8) for m in LM_METHODS for p in PROMPTS]
    mixed = engine.generate(everything + [Row(None, p, max_tokens=8) for p in PROMPTS])
    assert [r["text"] for r in mixed[-2:]] == [r["text"] for r in bare_before]  # the generalist is untouched
    assert "".join(engine.stream(Row(loaded["lora"], PROMPTS[0], max_tokens=8))) == mixed[0]["text"]


def test_many_lora_adapters_hot_load_and_unload_like_peft(bases, tmp_path):
    engine = BaseEngine(str(bases["llama"]))
    exports = [make_adapter(bases["llama"], tmp_path / f"lora{i}", "causal-lm", {"name": "lora", "r": 2 + i},
                            seed=200 + i) for i in range(4)]
    loaded = [engine.load(f"lora{i}", inspect(path)) for i, path in enumerate(exports)]
    pool = loaded[0].runner
    assert all(a.runner is pool for a in loaded)
    assert set(pool.lora.fast) == {a.key for a in loaded[1:]}  # the first built the pool through PEFT
    mixed = engine.generate([Row(a, p, max_tokens=6) for a in loaded for p in PROMPTS])
    for k, path in enumerate(exports):
        reference = reference_model(bases["llama"], path, "causal-lm", None)
        expected = greedy_texts(reference, engine.tokenizer, PROMPTS, 6)
        assert [r["text"] for r in mixed[2 * k: 2 * k + 2]] == expected, k
    for adapter in loaded[1:]:
        engine.unload(adapter)
    layers = list(pool.lora.layers.values())
    assert all(set(layer.lora_A) == {loaded[0].key} for layer in layers)
    assert engine.generate([Row(loaded[0], PROMPTS[0], max_tokens=6)])[0]["text"] == mixed[0]["text"]


def test_unload_waits_for_requests_in_flight(bases, adapters):
    engine = BaseEngine(str(bases["bert"]))
    adapter = engine.load("x", inspect(adapters["cls-lora"]))
    engine.lease(adapter)
    engine.unload(adapter)  # a request still holds it: it stays usable until released
    assert engine.classify([Row(adapter, "still here")])[0]["label"] in LABELS
    engine.release(adapter)
    assert adapter.key not in engine.adapters
    with pytest.raises(AdapterError, match="was unloaded"):
        engine.lease(adapter)


def test_bad_adapters_are_refused_with_one_line(bases, adapters, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["cls-lora"], pickled)
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle-format weights .*only safetensors"):
        inspect(pickled)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapters["cls-lora"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not safetensors at all")
    with pytest.raises(AdapterError, match="not valid safetensors"):
        inspect(corrupt)
    engine = BaseEngine(str(bases["bert"]))
    wrong = tmp_path / "wrong-base"
    shutil.copytree(adapters["cls-lora"], wrong)
    meta = json.loads((wrong / "onebase.json").read_text())
    (wrong / "onebase.json").write_text(json.dumps({**meta, "base_fingerprint": "0" * 64}))
    with pytest.raises(AdapterError, match="trained on a different base"):
        engine.load("wrong", inspect(wrong))
    with pytest.raises(AdapterError, match="needs a decoder base"):
        engine.load("lm", inspect(adapters["lm-lora"]))


def test_adapters_load_from_an_s3_compatible_store(bases, adapters, monkeypatch):
    """moto's S3 server on 127.0.0.1 stands in for MinIO / S3 (the same HTTP API boto3 speaks)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from onebase.serve.artifacts import fetch

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="adapters")
        for file in adapters["cls-houlsby"].iterdir():
            s3.upload_file(str(file), "adapters", f"team/houlsby/{file.name}")
        engine = BaseEngine(str(bases["bert"]))
        local = engine.load("s3", inspect(fetch("s3://adapters/team/houlsby")))
        direct = engine.load("dir", inspect(adapters["cls-houlsby"]))
        assert engine.classify([Row(local, TEXTS[0])]) == engine.classify([Row(direct, TEXTS[0])])
        with pytest.raises(AdapterError, match="no objects under that prefix"):
            fetch("s3://adapters/nothing-here")
    finally:
        server.stop()


# ---- the live server -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def register_versions(uri: str, name: str, exports: list[Path]) -> list[str]:
    """Log each export as a run artifact and register it, the way `onebase run` does."""
    from onebase.tracking import registry
    from onebase.tracking.mlflow_run import client

    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name("serve-tests") or None
    experiment_id = experiment.experiment_id if experiment else mlflow_client.create_experiment("serve-tests")
    versions = []
    for export in exports:
        run = mlflow_client.create_run(experiment_id)
        mlflow_client.log_artifacts(run.info.run_id, str(export), "adapter")
        mlflow_client.set_terminated(run.info.run_id)
        versions.append(registry.register(uri, name, run.info.run_id, "adapter", {"method": "lora"}))
    return versions


@pytest.fixture(scope="module")
def server(ray_cluster, bases, adapters, tmp_path_factory):
    from ray import serve

    from onebase.serve.app import build

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    v2 = make_adapter(bases["bert"], root / "lora-v2", "sequence-classification",
                      {"name": "lora", "r": 4, "target_modules": ["query", "value"]}, seed=77)
    register_versions(uri, "sentiment", [adapters["cls-lora"], v2])
    from onebase.tracking.mlflow_run import client

    client(uri).set_registered_model_alias("sentiment", "champion", "1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"tracking_uri": uri,
            "bases": [{"name": str(bases["bert"]), "alias": "tiny-bert", "cpus": 0.5, "max_adapters": 8},
                      {"name": str(bases["llama"]), "alias": "tiny-llama", "cpus": 0.5, "max_adapters": 8}],
            "adapters": [{"id": "sentiment", "source": "models:/sentiment@champion"},
                         {"id": "chat-lora", "source": str(adapters["lm-lora"])},
                         {"id": "chat-prefix", "source": str(adapters["lm-prefix"])},
                         {"id": "missing", "source": str(root / "no-such-dir")}],
            "auth": {"api_keys": ["test-key"], "admin_token": "admin-secret"},
            "limits": {"max_prompt_tokens": 64, "max_tokens": 32, "max_inputs": 8}}
    serve.run(build(args), name="onebase", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=60).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    yield {"url": url, "uri": uri, "adapters": adapters, "root": root}
    serve.delete("onebase")
    serve.shutdown()


KEY = {"Authorization": "Bearer test-key"}
ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.mark.slow
def test_openai_client_talks_to_the_base_and_its_adapters(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server['url']}/v1", api_key="test-key", max_retries=0)
    listed = {m.id: m for m in client.models.list().data}
    assert {"tiny-bert", "tiny-llama", "sentiment", "chat-lora", "chat-prefix"} <= set(listed)
    assert "missing" not in listed  # a configured adapter that failed to load is reported, not fatal
    bare = client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=6, temperature=0)
    tuned = client.completions.create(model="chat-lora", prompt="Hello there", max_tokens=6, temperature=0)
    assert bare.choices[0].text and tuned.choices[0].text and bare.choices[0].text != tuned.choices[0].text
    assert tuned.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="chat-prefix", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="chat-prefix", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True)]
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces) == chat.choices[0].message.content
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="chat-lora", prompt="Hello there", max_tokens=6, temperature=0, stream=True))
    assert streamed == tuned.choices[0].text


@pytest.mark.slow
def test_classify_hot_swap_and_promote_under_load_fail_no_request(server):
    url = server["url"]
    before = requests.post(f"{url}/v1/classify", json={"model": "sentiment", "input": TEXTS}, headers=KEY, timeout=60)
    assert before.status_code == 200, before.text
    assert all(r["label"] in LABELS for r in before.json()["data"])
    failures, answered, stop = [], [], threading.Event()

    def load_loop(model: str) -> None:
        for _ in range(400):  # bounded in count and time
            if stop.is_set():
                return
            r = requests.post(f"{url}/v1/classify", json={"model": model, "input": TEXTS[:2]}, headers=KEY,
                              timeout=60)
            (answered if r.status_code == 200 else failures).append((model, r.status_code, r.text[:200]))

    workers = [threading.Thread(target=load_loop, args=(m,)) for m in ("sentiment", "sentiment", "chat-lora-cls")]
    # chat-lora-cls does not exist until loaded: its loop starts after the load below.
    for w in workers[:2]:
        w.start()
    try:
        loaded = requests.post(f"{url}/admin/adapters", headers=ADMIN, timeout=120,
                               json={"id": "chat-lora-cls", "source": str(server["adapters"]["cls-ia3"])})
        assert loaded.status_code == 201, loaded.text
        workers[2].start()
        promoted = requests.post(f"{url}/admin/adapters/sentiment/promote", headers=ADMIN, timeout=120,
                                 json={"version": 2})
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["resolved_source"] == "models:/sentiment/2"
        time.sleep(3)
    finally:
        stop.set()
        for w in workers:
            if w.is_alive() or w.ident:
                w.join(timeout=120)
    assert not failures, failures[:3]
    assert len(answered) > 10
    after = requests.post(f"{url}/v1/classify", json={"model": "sentiment", "input": TEXTS}, headers=KEY, timeout=60)
    assert after.json()["data"] != before.json()["data"]  # version 2 answers now
    from onebase.tracking.mlflow_run import client

    assert str(client(server["uri"]).get_model_version_by_alias("sentiment", "champion").version) == "2"
    listing = requests.get(f"{url}/admin/adapters", headers=ADMIN, timeout=60).json()
    assert {a["id"] for a in listing["adapters"]} >= {"sentiment", "chat-lora-cls"}
    unloaded = requests.delete(f"{url}/admin/adapters/chat-lora-cls", headers=ADMIN, timeout=60)
    assert unloaded.status_code == 200
    gone = requests.post(f"{url}/v1/classify", json={"model": "chat-lora-cls", "input": "x"}, headers=KEY, timeout=60)
    assert gone.status_code == 404 and "not found" in gone.json()["error"]["message"]


@pytest.mark.slow
def test_bad_adapters_and_bad_requests_get_4xx_while_serving_continues(server, bases, tmp_path):
    url, adapters = server["url"], server["adapters"]
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["cls-lora"], pickled)
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, pickled / "adapter_model.bin")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapters["cls-lora"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage")
    wrong = tmp_path / "wrong"
    shutil.copytree(adapters["cls-lora"], wrong)
    meta = json.loads((wrong / "onebase.json").read_text())
    (wrong / "onebase.json").write_text(json.dumps({**meta, "base_fingerprint": "f" * 64}))
    cases = {"pickled": (pickled, "only safetensors"), "corrupt": (corrupt, "not valid safetensors"),
             "wrong": (wrong, "trained on a base that is not served"),
             "../escape": (adapters["cls-lora"], "adapter id"),
             "nowhere": (tmp_path / "nope", "no such directory")}
    for adapter_id, (source, message) in cases.items():
        r = requests.post(f"{url}/admin/adapters", headers=ADMIN, json={"id": adapter_id, "source": str(source)},
                          timeout=120)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (adapter_id, r.text)
    checks = [
        ("post", "/v1/classify", {"model": "sentiment", "input": "x"}, {}, 401, "API key"),
        ("post", "/v1/classify", {"model": "sentiment", "input": "x"}, {"Authorization": "Bearer no"}, 401, "API key"),
        ("get", "/admin/adapters", None, KEY, 401, "admin token"),
        ("post", "/v1/classify", {"model": "sentiment", "input": ["x"] * 9}, KEY, 400, "1 to 8 texts"),
        ("post", "/v1/completions", {"model": "chat-lora", "prompt": "hi", "max_tokens": 500}, KEY, 400, "max_tokens"),
        ("post", "/v1/completions", {"model": "chat-lora", "prompt": "word " * 200}, KEY, 400, "limit is 64"),
        ("post", "/v1/completions", {"model": "sentiment", "prompt": "hi"}, KEY, 400, "does not generate"),
        ("post", "/v1/classify", {"model": "nope", "input": "x"}, KEY, 404, "not found"),
    ]
    for method, path, body, headers, status, message in checks:
        r = getattr(requests, method)(f"{url}{path}", json=body, headers=headers, timeout=60)
        assert r.status_code == status and message in r.json()["error"]["message"], (path, r.status_code, r.text)
    ok = requests.post(f"{url}/v1/classify", json={"model": "sentiment", "input": "still up"}, headers=KEY, timeout=60)
    assert ok.status_code == 200


@pytest.mark.slow
def test_cli_query_and_adapters(server, workspace):
    from conftest import onebase_cli

    env = {"ONEBASE_URL": server["url"], "ONEBASE_API_KEY": "test-key", "ONEBASE_ADMIN_TOKEN": "admin-secret"}
    result = onebase_cli("query", "--adapter", "sentiment", "I love this", cwd=workspace, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    label, probs = result.stdout.split(None, 1)
    assert label in LABELS and set(json.loads(probs)) == set(LABELS)
    listed = onebase_cli("adapters", "list", cwd=workspace, env=env, timeout=120)
    assert listed.returncode == 0 and "sentiment" in listed.stdout and "missing" in listed.stdout
    refused = onebase_cli("adapters", "load", "x", "/no/such/dir", cwd=workspace, env=env, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "no such directory" in refused.stderr
