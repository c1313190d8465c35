"""Serving: one frozen base, every adapter method on it, chosen per request; hot swap; refusals.

Engine tests run the serving engine in-process; the live tests run the real Ray Serve app on
127.0.0.1 and talk to it over HTTP with `requests` and the official `openai` client.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from adapter_factory import LABELS, make_adapter, reference_model, tiny_base
from conftest import wait_for
from onebase.model.build import load_tokenizer
from onebase.runtime import free_port
from onebase.serve.artifacts import AdapterError, inspect
from onebase.serve.client import Client
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


def test_adapters_load_from_an_s3_compatible_store_and_replicas_load_the_bytes_checked(bases, adapters,
                                                                                      monkeypatch, tmp_path):
    """moto's S3 server on 127.0.0.1 stands in for MinIO / S3 (the same HTTP API boto3 speaks)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from onebase.serve.artifacts import content_digest, fetch, fetch_checked, s3_listing

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
        # A load pins what it checked: the objects' ETags and the files' digest (the catalog entry
        # carries both); replicas fetch with them. Then someone overwrites an object in the bucket.
        source = "s3://adapters/team/houlsby"
        pin = s3_listing(source)
        checked = fetch(source, pin=pin)
        digest = content_digest(checked)
        config = json.loads((checked / "adapter_config.json").read_text())
        s3.put_object(Bucket="adapters", Key="team/houlsby/adapter_config.json",
                      Body=json.dumps({**config, "note": "changed"}).encode())
        # A replica on this node loads the checked copy: a fetch never replaces it.
        assert fetch_checked(source, digest, pin=pin) == checked and content_digest(checked) == digest
        # A replica on another node (its own cache) cannot get the checked bytes any more: refused.
        monkeypatch.setenv("ONEBASE_CACHE", str(tmp_path / "other-node"))
        with pytest.raises(AdapterError, match="adapter_config.json changed since it was checked"):
            fetch_checked(source, digest, pin=pin)
        # A new load sees the new objects, in a directory of its own; old digests no longer match.
        fresh = fetch(source)
        assert fresh != checked and "changed" in (fresh / "adapter_config.json").read_text()
        with pytest.raises(AdapterError, match="its files changed since they were checked"):
            fetch_checked(str(fresh), digest)
    finally:
        server.stop()


def test_a_mistyped_base_task_or_a_long_adapter_id_is_a_config_error(tmp_path):
    """`onebase serve` reads its config before Ray starts: a base task that is not causal-lm or
    sequence-classification (it used to be served as an encoder) and a 65-character adapter id are
    one-line errors naming the field."""
    import yaml

    from onebase.errors import SpecError
    from onebase.serve.run import read_config

    shipped = (Path(__file__).parents[1] / "serving" / "local.yaml").read_text()
    for field, section, index, change in (("bases.1.task", "bases", 1, {"task": "casual-lm"}),
                                          ("adapters.0.id", "adapters", 0, {"id": "a" * 65})):
        config = yaml.safe_load(shipped)
        config["applications"][0]["args"][section][index].update(change)
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(SpecError, match=f"applications.0.args.{field}") as refused:
            read_config(path)
        assert "\n" not in str(refused.value)


# ---- the live server -------------------------------------------------------------------------

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
def server(serve_http, bases, adapters, tmp_path_factory):
    from ray import serve

    from onebase.serve.app import build

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    v2 = make_adapter(bases["bert"], root / "lora-v2", "sequence-classification",
                      {"name": "lora", "r": 4, "target_modules": ["query", "value"]}, seed=77)
    register_versions(uri, "sentiment", [adapters["cls-lora"], v2])
    from onebase.tracking.mlflow_run import client

    client(uri).set_registered_model_alias("sentiment", "champion", "1")
    args = {"tracking_uri": uri,
            "bases": [{"name": str(bases["bert"]), "alias": "tiny-bert", "cpus": 0.25, "max_adapters": 8,
                       "replicas": 2},
                      {"name": str(bases["llama"]), "alias": "tiny-llama", "cpus": 0.25, "max_adapters": 8},
                      # The same weights again with room for one running row and one waiting request:
                      # the queue and disconnect tests (listed last: adapters pick the first base that fits).
                      {"name": str(bases["llama"]), "alias": "tiny-llama-q", "cpus": 0.25, "max_adapters": 1,
                       "max_batch_size": 1, "max_queue": 1, "batch_wait_ms": 0}],
            "adapters": [{"id": "sentiment", "source": "models:/sentiment@champion"},
                         {"id": "chat-lora", "source": str(adapters["lm-lora"])},
                         {"id": "chat-prefix", "source": str(adapters["lm-prefix"])},
                         {"id": "missing", "source": str(root / "no-such-dir")}],
            "auth": {"api_keys": ["test-key"], "admin_token": "admin-secret"},
            "limits": {"max_prompt_tokens": 64, "max_tokens": 512, "max_inputs": 8, "max_n": 4}}
    serve.run(build(args), name="onebase", route_prefix="/", blocking=False)
    url = serve_http
    Client(url).wait_ready(180)  # raises ServeError when the app is not up by then
    yield {"url": url, "uri": uri, "adapters": adapters, "root": root}
    serve.delete("onebase")


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
        assert loaded.json()["replicas"] == 2  # the admin load reached both replicas of tiny-bert
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
    served = sum(1 for m, *_ in answered if m == "chat-lora-cls")
    for _ in range(20):  # replicas report their figures every second
        listing = requests.get(f"{url}/admin/adapters", headers=ADMIN, timeout=60).json()
        figures = next(a for a in listing["adapters"] if a["id"] == "chat-lora-cls")
        if figures["requests"] >= served:
            break
        time.sleep(0.5)
    assert {a["id"] for a in listing["adapters"]} >= {"sentiment", "chat-lora-cls"}
    assert len(figures["replicas"]) == 2 and all(r["load_ms"] > 0 for r in figures["replicas"].values())
    assert figures["requests"] >= served and figures["p50_ms"] > 0
    from onebase.serve.artifacts import content_digest

    assert figures["digest"] == content_digest(server["adapters"]["cls-ia3"])  # what every replica loaded
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
        ("post", "/v1/completions", {"model": "chat-lora", "prompt": "hi", "max_tokens": 5000}, KEY, 400, "max_tokens"),
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


# ---- the engine's batching: gathered LoRA, continuous batching ---------------------------------

@pytest.fixture(scope="module")
def lora_engine(bases, tmp_path_factory):
    """A llama engine with three plain LoRA adapters of ranks 2, 4 and 8 (stacks padded to 8)."""
    root = tmp_path_factory.mktemp("gathered")
    engine = BaseEngine(str(bases["llama"]))
    exports = [make_adapter(bases["llama"], root / f"r{r}", "causal-lm", {"name": "lora", "r": r}, seed=300 + r)
               for r in (2, 4, 8)]
    return engine, [engine.load(f"r{p.name}", inspect(p)) for p in exports], exports


def test_gathered_lora_forward_equals_peft_mixed_batches(lora_engine, bases, tmp_path):
    engine, loaded, exports = lora_engine
    pool = loaded[0].runner
    gathered = pool.gathered
    assert set(gathered.slots) == {a.key for a in loaded} and gathered.rank == 8
    keys = [loaded[0].key, None, loaded[2].key, loaded[1].key, loaded[0].key]
    enc = engine.tokenizer([PROMPTS[0]] * len(keys), return_tensors="pt")
    with torch.no_grad():
        peft = pool.model(**enc, adapter_names=[k or "__base__" for k in keys]).logits
        with gathered.rows(keys):
            fast = pool.model(**enc).logits
    assert not torch.equal(peft[0], peft[1])  # the adapters change the logits
    assert torch.allclose(fast, peft, atol=1e-5)  # tolerance: float summation order only
    # One token per row (a decode step) takes the masked dense products instead of per-adapter segments.
    step = {"input_ids": enc["input_ids"][:, -1:], "attention_mask": enc["attention_mask"][:, -1:]}
    with torch.no_grad():
        peft_step = pool.model(**step, adapter_names=[k or "__base__" for k in keys]).logits
        with gathered.rows(keys):
            fast_step = pool.model(**step).logits
    assert torch.allclose(fast_step, peft_step, atol=1e-5) and not torch.equal(peft_step[0], peft_step[1])
    # Hot load and unload reuse slots in place; the stacks stay equal to PEFT's layers.
    freed = gathered.slots[loaded[1].key]
    engine.unload(loaded[1])
    extra = engine.load("extra", inspect(make_adapter(bases["llama"], tmp_path / "x", "causal-lm",
                                                      {"name": "lora", "r": 4}, seed=999)))
    assert gathered.slots[extra.key] == freed and gathered.capacity == 4
    texts = engine.generate([Row(extra, p, max_tokens=6) for p in PROMPTS])
    reference = reference_model(bases["llama"], extra.info.path, "causal-lm", None)
    assert [t["text"] for t in texts] == greedy_texts(reference, engine.tokenizer, PROMPTS, 6)
    engine.unload(extra)
    loaded[1] = engine.load(loaded[1].id, loaded[1].info)


def test_continuous_batching_lets_a_late_short_request_finish_first_with_the_same_outputs(lora_engine):
    engine, loaded, _ = lora_engine
    batcher = engine.batcher
    alone = {name: engine.generate([row])[0]["text"] for name, row in {
        "long": Row(loaded[0], PROMPTS[0], max_tokens=24), "short": Row(loaded[2], PROMPTS[1], max_tokens=4),
        "bare": Row(None, PROMPTS[1], max_tokens=4)}.items()}
    long = batcher.submit(engine.sequence(Row(loaded[0], PROMPTS[0], max_tokens=24)))
    for _ in range(3):
        batcher.step()
    assert len(long.tokens) == 3
    short = batcher.submit(engine.sequence(Row(loaded[2], PROMPTS[1], max_tokens=4)))
    bare = batcher.submit(engine.sequence(Row(None, PROMPTS[1], max_tokens=4)))
    cancelled = batcher.submit(engine.sequence(Row(loaded[1], PROMPTS[0], max_tokens=24)))
    batcher.step()
    assert batcher.running() == 4  # one batch, four adapters (the bare base included)
    cancelled.cancelled = True
    while not short.done.is_set():
        batcher.step()
    assert not long.done.is_set() and bare.done.is_set()  # arrived mid-generation, finished first
    assert cancelled.finish_reason == "cancelled" and batcher.running() == 1  # its KV rows are gone
    while not long.done.is_set():
        batcher.step()
    assert {"long": long.text, "short": short.text, "bare": bare.text} == alone
    assert not batcher.batches


def test_streamed_logprobs_follow_the_text_sent_also_when_a_stop_sequence_holds_text_back(lora_engine):
    """Each streamed piece carries the logprobs of the tokens that begin in it; text that may start a
    stop sequence is held back, and so are its tokens' logprobs. Joined, pieces and logprobs are the
    whole answer's: with a stop sequence, no logprobs for the tokens it cut off."""
    engine, loaded, _ = lora_engine
    text = engine.generate([Row(loaded[0], PROMPTS[0], max_tokens=16)])[0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    for stops in ((), (stop,)):
        row = Row(loaded[0], PROMPTS[0], max_tokens=16, stop=stops, logprobs=2)
        whole = engine.generate([row])[0]
        pieces: list[tuple[str, list]] = []
        seq = engine.batcher.submit(engine.sequence(row, on_text=lambda t, lps, pieces=pieces: pieces.append((t, lps))))
        while not seq.done.is_set():
            engine.batcher.step()
        sent = 0
        for piece, logprobs in pieces:
            assert all(sent <= e["offset"] < sent + len(piece) for e in logprobs), (piece, logprobs)
            sent += len(piece)
        assert "".join(p for p, _ in pieces) == whole["text"] and len(pieces) >= 4
        assert [e for _, lps in pieces for e in lps] == whole["logprobs"]
        assert all(len(e["top"]) == 2 for e in whole["logprobs"])
    assert whole["finish_reason"] == "stop" and whole["text"] == text[:text.index(stop)]
    assert len(whole["logprobs"]) < 16  # the stop sequence's tokens (and what followed) have none


@pytest.mark.slow
def test_openai_sampling_fields_through_the_official_client(server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server['url']}/v1", api_key="test-key", max_retries=0)
    plain = client.completions.create(model="chat-lora", prompt="Hello there", max_tokens=12, temperature=0)
    text = plain.choices[0].text
    assert len(text) > 4
    # stop: the text ends before the stop sequence, which is not returned; finish_reason "stop".
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = client.completions.create(model="chat-lora", prompt="Hello there", max_tokens=12, temperature=0,
                                        stop=[stop, "never-seen"])
    assert stopped.choices[0].text == text[: text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    # n independent samples; a seed makes them reproducible (sample i uses seed + i).
    sampled = [client.completions.create(model="chat-lora", prompt="Hello there", max_tokens=8, temperature=1.0,
                                         n=3, seed=seed) for seed in (7, 7, 8)]
    first, again, other = ([c.text for c in r.choices] for r in sampled)
    assert len(first) == 3 and len(set(first)) > 1 and first == again and first != other
    assert sampled[0].usage.prompt_tokens == plain.usage.prompt_tokens  # one prompt, counted once
    # n on a stream: the samples' chunks interleave, told apart by index; each is its unstreamed twin.
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model="chat-lora", prompt="Hello there", max_tokens=8, temperature=1.0,
                                           n=3, seed=7, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == first
    chat_body = {"model": "chat-lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                 "temperature": 1.0, "n": 2, "seed": 3}
    whole = client.chat.completions.create(**chat_body)
    chunks = list(client.chat.completions.create(**chat_body, stream=True, stream_options={"include_usage": True}))
    deltas: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            deltas[choice.index] = deltas.get(choice.index, "") + (choice.delta.content or "")
    assert [deltas[0], deltas[1]] == [c.message.content for c in whole.choices]
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # the prompt counted once, both samples
    # logprobs: the chosen token's and the top k, consistent with the greedy choice.
    scored = client.completions.create(model="chat-lora", prompt="Hello there", max_tokens=4, temperature=0,
                                       logprobs=3)
    lp = scored.choices[0].logprobs
    assert "".join(lp.tokens) == scored.choices[0].text and len(lp.top_logprobs[0]) == 3
    assert all(abs(max(top.values()) - chosen) < 1e-4 for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="chat-lora", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    # usage on a stream when asked for: a last chunk with no choices.
    chunks = list(client.chat.completions.create(model="chat-lora", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] in ("stop", "length")
    refusals = [({"n": 9}, "n: give 1 to 4"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop: up to 4"),
                ({"stop": "x" * 65}, "stop: up to 4"), ({"logprobs": 21}, "top_logprobs: give 0 to 20")]
    for extra, message in refusals:
        with pytest.raises(BadRequestError, match=message):
            client.completions.create(model="chat-lora", prompt="hi", max_tokens=2, **extra)
    with pytest.raises(BadRequestError, match="top_logprobs: give 0 to 20"):
        client.chat.completions.create(model="chat-lora", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, logprobs=True, top_logprobs=21)


def completion_stream_logprobs(chunks) -> dict[int, dict]:
    """Per sample: the streamed text and its tokens' (token, logprob, top, offset), checking on the way
    that every chunk's tokens begin within that chunk's text."""
    samples: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            got = samples.setdefault(choice.index, {"text": "", "entries": [], "chunks": 0})
            if choice.logprobs and choice.logprobs.tokens:
                lp, start = choice.logprobs, len(got["text"])
                assert all(start <= at < start + len(choice.text) for at in lp.text_offset) or not choice.text
                got["entries"] += zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset)
                got["chunks"] += 1
            got["text"] += choice.text
    return samples


def chat_stream_logprobs(chunks) -> dict[int, dict]:
    samples: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            got = samples.setdefault(choice.index, {"text": "", "entries": [], "chunks": 0})
            if choice.logprobs and choice.logprobs.content:
                got["entries"] += choice.logprobs.content
                got["chunks"] += 1
            got["text"] += choice.delta.content or ""
    return samples


def close(a: float, b: float) -> bool:
    # Streamed and whole requests may share a batch with different rows: float summation order only.
    return abs(a - b) < 1e-4


@pytest.mark.slow
def test_streamed_logprobs_add_up_to_the_whole_answers_through_the_official_client(server):
    """logprobs on streamed completions and chats: each chunk carries its tokens' logprobs (OpenAI's
    shapes), and per sample (n = 2, told apart by index) they are the unstreamed greedy answer's, also
    when a stop sequence cuts the text (no logprobs for the cut tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server['url']}/v1", api_key="test-key", max_retries=0)
    body = {"model": "chat-lora", "prompt": "Hello there", "max_tokens": 12, "temperature": 0, "n": 2,
            "logprobs": 3}
    text = client.completions.create(**body).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    for extra in ({}, {"stop": [stop]}):
        whole = client.completions.create(**body, **extra)
        streamed = completion_stream_logprobs(client.completions.create(**body, **extra, stream=True))
        assert sorted(streamed) == [0, 1]
        for choice in whole.choices:
            got, lp = streamed[choice.index], choice.logprobs
            assert got["text"] == choice.text and got["chunks"] >= 2
            tokens, values, tops, offsets = (list(column) for column in zip(*got["entries"]))
            assert tokens == lp.tokens and offsets == lp.text_offset
            assert all(close(a, b) for a, b in zip(values, lp.token_logprobs, strict=True))
            assert [list(t) for t in tops] == [list(t) for t in lp.top_logprobs]  # same top tokens, same order
            assert all(close(t[k], w[k]) for t, w in zip(tops, lp.top_logprobs) for k in t)
    assert choice.finish_reason == "stop" and choice.text == text[:text.index(stop)]
    assert len(lp.tokens) < 12  # the stop sequence's tokens have no logprobs, streamed or not

    chat_body = {"model": "chat-lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                 "temperature": 0, "n": 2, "logprobs": True, "top_logprobs": 2}
    content = client.chat.completions.create(**chat_body).choices[0].message.content
    stop = content[len(content) // 2:len(content) // 2 + 2]
    for extra in ({}, {"stop": stop}):
        whole = client.chat.completions.create(**chat_body, **extra)
        streamed = chat_stream_logprobs(client.chat.completions.create(**chat_body, **extra, stream=True))
        for choice in whole.choices:
            got, expected = streamed[choice.index], choice.logprobs.content
            assert got["text"] == choice.message.content and got["chunks"] >= 2
            assert [(t.token, t.bytes) for t in got["entries"]] == [(t.token, t.bytes) for t in expected]
            assert all(close(a.logprob, b.logprob) for a, b in zip(got["entries"], expected))
            assert all([x.token for x in a.top_logprobs] == [x.token for x in b.top_logprobs] and
                       all(close(x.logprob, y.logprob) for x, y in zip(a.top_logprobs, b.top_logprobs))
                       for a, b in zip(got["entries"], expected))
            assert all(len(t.top_logprobs) == 2 for t in got["entries"])
    assert choice.finish_reason == "stop" and choice.message.content == content[:content.index(stop)]


@pytest.mark.slow
def test_a_request_arriving_mid_generation_finishes_before_a_long_one(server):
    """Continuous batching through the server: the long stream is running when the short request
    arrives; the short one joins the running batch and returns while the long one still streams
    (a reader thread stamps each event of the long stream as it arrives)."""
    url = server["url"]
    body = {"model": "chat-lora", "prompt": "Hello there", "max_tokens": 128, "temperature": 0, "stream": True}
    arrivals: list[tuple[float, bytes]] = []
    started = threading.Event()

    def read_long() -> None:
        with requests.post(f"{url}/v1/completions", json=body, headers=KEY, stream=True, timeout=120) as long:
            for line in long.iter_lines():
                if line:
                    arrivals.append((time.perf_counter(), line))
                    started.set()

    reader = threading.Thread(target=read_long)
    reader.start()
    assert started.wait(120)  # the long request is generating
    short = requests.post(f"{url}/v1/completions", headers=KEY, timeout=120,
                          json={"model": "chat-prefix", "prompt": "The weather today is", "max_tokens": 2,
                                "temperature": 0})
    short_done = time.perf_counter()
    reader.join(120)
    assert short.status_code == 200, short.text
    final = json.loads(arrivals[-2][1][6:])  # the last event before [DONE]
    assert final["choices"][0]["finish_reason"] == "length", "the long request ended early (EOS)"
    assert short_done < arrivals[-1][0]
    assert sum(1 for t, _ in arrivals if t > short_done) > 10  # it still had most of its tokens to go


def decoding(url: str, base: str) -> dict:
    """What the base's replica is decoding: running rows, waiting requests, finished per reason."""
    return requests.get(f"{url}/admin/adapters", headers=ADMIN, timeout=60).json()["decoding_on_a_replica"][base]


@pytest.mark.slow
def test_a_full_queue_answers_429_and_a_client_that_disconnects_frees_its_row(server):
    """tiny-llama-q holds one running row and one waiting request (max_batch_size 1, max_queue 1).
    A long stream runs, a second request waits, a third is refused with 429. The long stream's client
    then hangs up mid-generation: the replica cancels its sequence at the next step, and the waiting
    request gets the freed row and finishes."""
    url = server["url"]
    body = {"model": "tiny-llama-q", "prompt": "Hello there", "max_tokens": 512, "temperature": 0, "stream": True}
    before = decoding(url, "tiny-llama-q")["finished"].get("cancelled", 0)
    long = requests.post(f"{url}/v1/completions", json=body, headers=KEY, stream=True, timeout=120)
    assert long.status_code == 200, long.text
    events = long.iter_lines()
    assert next(line for line in events if line).startswith(b"data: ")  # it is decoding
    waiting: dict = {}
    second = threading.Thread(target=lambda: waiting.update(r=requests.post(
        f"{url}/v1/completions", headers=KEY, timeout=120,
        json={"model": "tiny-llama-q", "prompt": "The weather today is", "max_tokens": 3, "temperature": 0})))
    second.start()
    try:
        wait_for(lambda: decoding(url, "tiny-llama-q")["waiting"] == 1, "the second request waits in the queue")
        refused = requests.post(f"{url}/v1/completions", headers=KEY, timeout=60,
                                json={"model": "tiny-llama-q", "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 429, refused.text
        message = refused.json()["error"]["message"]
        assert "1 requests waiting (max_queue 1); retry later" in message and "\n" not in message
        assert decoding(url, "tiny-llama-q")["running"] == 1  # the long stream still holds the only row
    finally:
        long.close()  # the client goes away mid-generation
        second.join(120)
    assert waiting["r"].status_code == 200, waiting["r"].text
    assert waiting["r"].json()["choices"][0]["finish_reason"] in ("length", "stop")
    after = wait_for(lambda: (d := decoding(url, "tiny-llama-q"))["running"] == 0 and d, "the rows are freed")
    assert after["finished"].get("cancelled", 0) == before + 1 and after["waiting"] == 0


# ---- every trained task: token classification and extractive QA --------------------------------

WORDS = ["alice", "bob", "paris", "berlin", "went", "to", "met", "in", "monday", "the", "city", "carol"]
ENTITIES = {"alice": "PER", "bob": "PER", "carol": "PER", "paris": "LOC", "berlin": "LOC"}
TAGS = ["LOC", "O", "PER"]  # what training infers from the data (sorted)
TAG_TEXT = "on monday alice  went to paris"
QUESTION, CONTEXT = "where did bob go?", "on monday bob went to berlin and met friends"


@pytest.fixture(scope="module")
def task_adapters(ray_cluster, bases, tmp_path_factory) -> dict[str, Path]:
    """A token-classification LoRA and an extractive-QA Houlsby adapter trained by `onebase run`'s own
    run_job (Ray Train + DeepSpeed, a few steps) on the served tiny BERT, from a JSONL and a CSV."""
    import random

    from conftest import tiny_spec
    from onebase.spec import parse_spec
    from onebase.train.launch import run_job

    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        rows.append(json.dumps({"words": words, "ner": [ENTITIES.get(w, "O") for w in words]}))
    (root / "ner.jsonl").write_text("\n".join(rows) + "\n")
    lines = ["question,context,answer,answer_start"]
    for _ in range(64):
        person, city = rng.choice(["alice", "bob", "carol"]), rng.choice(["paris", "berlin", "rome"])
        context = f"on monday {person} went to {city} and met friends"
        lines.append(f"where did {person} go?,{context},{city},{context.index(city)}")
    (root / "qa.csv").write_text("\n".join(lines) + "\n")
    jobs = {"tags": ("token-classification", {"source": str(root / "ner.jsonl"),
                                              "columns": {"tokens": "words", "tags": "ner"}},
                     {"name": "lora", "r": 4, "target_modules": ["query", "value"]}),
            "qa": ("extractive-qa", {"source": str(root / "qa.csv")}, {"name": "houlsby", "bottleneck": 8})}
    made = {}
    for name, (task, data, method) in jobs.items():
        spec = tiny_spec(f"serve-{name}", task=task, data={**data, "validation": {"fraction": 0.25}}, method=method,
                         train={"max_steps": 6, "eval_every_steps": 6, "learning_rate": 5e-3},
                         scaling={"num_workers": 1}, deepspeed={"stage": 2},
                         tracking={"register_model": False}, output={"path": str(root / "runs")})
        spec["model"] = {"name": str(bases["bert"])}  # the served base's own directory
        made[name] = run_job(parse_spec(spec), "", progress=False, echo=lambda *_: None).export_dir
    return made


def reference_tags(base: Path, export: Path, text: str) -> list[tuple[str, float]]:
    """(label, score) per word from the tuned model rebuilt the plain way (the first subword's logits)."""
    reference = reference_model(base, export, "token-classification", TAGS)
    tokenizer = load_tokenizer(str(base))
    enc = tokenizer([text.split()], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        probs = reference(**enc).logits[0].softmax(-1)
    firsts = [enc.word_ids(0).index(w) for w in range(len(text.split()))]
    return [(TAGS[int(probs[p].argmax())], float(probs[p].max())) for p in firsts]


def reference_span(base: Path, export: Path, question: str, context: str) -> tuple[str, float]:
    """The best span (start <= end < start + 30, inside the context) of the tuned model rebuilt the plain way."""
    reference = reference_model(base, export, "extractive-qa", None)
    enc = load_tokenizer(str(base))(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0]
    with torch.no_grad():
        out = reference(**enc)
    starts, ends = out.start_logits[0].softmax(-1), out.end_logits[0].softmax(-1)
    in_context = [i for i, s in enumerate(enc.sequence_ids(0)) if s == 1]
    score, i, j = max((starts[i] * ends[j], i, j) for i in in_context for j in in_context if i <= j < i + 30)
    return context[int(offsets[i][0]):int(offsets[j][1])], float(score)


def test_token_classification_and_extractive_qa_answer_like_their_models(bases, task_adapters):
    engine = BaseEngine(str(bases["bert"]))
    tagger = engine.load("tags", inspect(task_adapters["tags"]))
    reader = engine.load("qa", inspect(task_adapters["qa"]))
    tokens = engine.predict([Row(tagger, TAG_TEXT)], "token-classification")[0]["tokens"]
    assert [t["token"] for t in tokens] == TAG_TEXT.split()
    assert all(TAG_TEXT[t["start"]:t["end"]] == t["token"] for t in tokens)
    expected = reference_tags(bases["bert"], task_adapters["tags"], TAG_TEXT)
    assert [t["label"] for t in tokens] == [label for label, _ in expected]
    assert [t["score"] for t in tokens] == pytest.approx([score for _, score in expected], abs=1e-5)
    span = engine.predict([Row(reader, QUESTION, context=CONTEXT)], "extractive-qa")[0]
    answer, score = reference_span(bases["bert"], task_adapters["qa"], QUESTION, CONTEXT)
    assert span["answer"] == answer == CONTEXT[span["start"]:span["end"]]
    assert span["score"] == pytest.approx(score, abs=1e-5)
    with pytest.raises(AdapterError, match="token-classification model does not answer sequence-classification"):
        engine.predict([Row(tagger, TAG_TEXT)], "sequence-classification")


@pytest.mark.slow
def test_token_classification_and_qa_adapters_answer_through_the_server(server, bases, task_adapters):
    url = server["url"]
    for adapter_id in ("tags", "qa"):
        loaded = requests.post(f"{url}/admin/adapters", headers=ADMIN, timeout=120,
                               json={"id": adapter_id, "source": str(task_adapters[adapter_id])})
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["base"] == "tiny-bert"  # matched by the fingerprint training recorded
    tagged = requests.post(f"{url}/v1/tag", json={"model": "tags", "input": [TAG_TEXT, "hello"]}, headers=KEY,
                           timeout=60)
    assert tagged.status_code == 200, tagged.text
    words = tagged.json()["data"][0]["tokens"]
    expected = reference_tags(bases["bert"], task_adapters["tags"], TAG_TEXT)
    assert [(w["token"], w["label"]) for w in words] == list(zip(TAG_TEXT.split(), [lab for lab, _ in expected]))
    assert [w["score"] for w in words] == pytest.approx([score for _, score in expected], abs=1e-4)
    same = requests.post(f"{url}/v1/classify", headers=KEY, timeout=60,
                         json={"model": "tags", "input": [TAG_TEXT, "hello"], "granularity": "token"})
    assert same.json()["data"] == tagged.json()["data"]
    answered = requests.post(f"{url}/v1/answer", headers=KEY, timeout=60,
                             json={"model": "qa", "question": QUESTION, "context": CONTEXT})
    assert answered.status_code == 200, answered.text
    span = answered.json()["data"][0]
    answer, score = reference_span(bases["bert"], task_adapters["qa"], QUESTION, CONTEXT)
    assert span["answer"] == answer == CONTEXT[span["start"]:span["end"]]
    assert span["score"] == pytest.approx(score, abs=1e-4)
    refusals = [("/v1/answer", {"model": "qa", "question": "Who?"}, "context: give the text"),
                ("/v1/classify", {"model": "sentiment", "input": "x", "granularity": "token"},
                 "sequence-classification model does not answer token-classification"),
                ("/v1/classify", {"model": "tags", "input": "x"}, "token-classification model does not answer"),
                ("/v1/answer", {"model": "tags", "question": "Who?", "context": "Ada"},
                 "does not answer extractive-qa")]
    for path, body, message in refusals:
        r = requests.post(f"{url}{path}", json=body, headers=KEY, timeout=60)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (path, r.text)


def test_a_full_replica_queue_refuses_and_a_cancelled_request_frees_its_rows(bases):
    """The replica's scheduler (one thread owns the model): with one row running and one waiting, a
    third request is refused (HTTP 429 at the gateway); a caller that goes away leaves the batch."""
    import asyncio

    from onebase.serve.scheduler import QueueFull, Scheduler

    engine = BaseEngine(str(bases["llama"]))
    scheduler = Scheduler(engine, max_rows=1, max_queue=1, wait_s=0)

    async def scenario() -> tuple[dict, list]:
        running = engine.sequence(Row(None, PROMPTS[0], max_tokens=1000))
        long = scheduler.generate([running])
        await long.__anext__()  # it is decoding
        short = scheduler.generate([engine.sequence(Row(None, PROMPTS[1], max_tokens=3))])
        waiting = asyncio.ensure_future(short.__anext__())
        while not engine.batcher.waiting:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="1 requests waiting .*retry later"):
            await scheduler.generate([engine.sequence(Row(None, "x", max_tokens=2))]).__anext__()
        await long.aclose()  # the client went away
        items = [await waiting] + [item async for item in short]
        return running, items

    running, items = asyncio.run(scenario())
    assert running.finish_reason == "cancelled" and len(running.tokens) < 1000
    assert items[-1][1]["finish_reason"] in ("length", "stop")
    deadline = time.time() + 10
    while engine.batcher.pending() and time.time() < deadline:  # the finished row leaves after its step
        time.sleep(0.01)
    assert not engine.batcher.pending()
    assert QueueFull.status == 429


def test_streamed_pieces_that_pile_up_while_the_reader_is_busy_go_out_together(bases):
    """When the replica's event loop falls behind the decoding thread, the text pieces waiting for it
    leave as one event (fewer hops through gateway and proxy), and the text is unchanged."""
    import asyncio

    from onebase.serve.scheduler import Scheduler

    engine = BaseEngine(str(bases["llama"]))
    scheduler = Scheduler(engine, max_rows=4, max_queue=4, wait_s=0)
    expected = engine.generate([Row(None, PROMPTS[0], max_tokens=24, logprobs=1)])[0]

    async def read_slowly() -> list:
        items = []
        async for _, item in scheduler.generate([engine.sequence(Row(None, PROMPTS[0], max_tokens=24, logprobs=1))]):
            items.append(item)
            await asyncio.sleep(0.3)  # a busy loop: the decoding thread runs ahead meanwhile
        return items

    *pieces, final = asyncio.run(read_slowly())
    assert final["text"] == expected["text"] and final["completion_tokens"] == 24
    assert "".join(p.text for p in pieces) == final["text"] and 1 <= len(pieces) <= 12  # two or more tokens per event
    assert [e for p in pieces for e in p.logprobs] == final["logprobs"]  # their logprobs joined too
    assert len(final["logprobs"]) == 24


def test_a_bfloat16_replica_serves_adapters_trained_in_fp32_close_to_their_fp32_models(bases, adapters):
    """`dtype: bfloat16` (half the memory; twice fp32's matmul rate on CPUs with AVX512-BF16 or AMX): the
    base keeps its fp32 fingerprint, so adapters trained in fp32 are accepted, every adapter method runs in
    one dtype, and answers stay within bf16 rounding of the fp32 models'."""
    engine = BaseEngine(str(bases["llama"]), dtype="bfloat16")
    assert engine.fingerprint == BaseEngine(str(bases["llama"])).fingerprint
    prompt = PROMPTS[1]
    for name in ("lora", "houlsby", "prefix", "prompt"):
        loaded = engine.load(name, inspect(adapters[f"lm-{name}"]))
        assert {p.dtype for p in loaded.runner.model.parameters()} == {torch.bfloat16}, name
        got = engine.generate([Row(loaded, prompt, max_tokens=4, logprobs=0)])[0]
        assert got["completion_tokens"] == 4 or got["finish_reason"] == "stop", name
        reference = reference_model(bases["llama"], adapters[f"lm-{name}"], "causal-lm", None)
        enc = engine.tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            expected = reference(**enc).logits[0, -1].log_softmax(-1)
        first = engine.tokenizer(got["logprobs"][0]["token"], add_special_tokens=False)["input_ids"]
        assert abs(got["logprobs"][0]["logprob"] - float(expected[first[0]])) < 0.05, name
    classifier = BaseEngine(str(bases["bert"]), dtype="bfloat16")
    for name in ("lora", "houlsby"):
        loaded = classifier.load(name, inspect(adapters[f"cls-{name}"]))
        reference = reference_model(bases["bert"], adapters[f"cls-{name}"], "sequence-classification")
        with torch.no_grad():
            expected = reference(**classifier.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
        assert torch.allclose(probabilities(classifier.classify([Row(loaded, t) for t in TEXTS])), expected,
                              atol=0.02), name
