"""Prompt programs served beside adapters: one base replica serves the bare base, an adapter and
programs at once, on the same frozen model object.

A classification program is evaluated and registered by `onebase prompt eval`'s own code path
(real Ray actors, real sqlite MLflow), loaded into the real Ray Serve app on 127.0.0.1 with
`onebase adapters load ID models:/NAME/V`, and `/v1/classify` must give the eval's answers on the
same rows. A generation program (a plain local dir in the Serve config) answers the official
`openai` client like a ProgramRunner on a fresh copy of the base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch

from adapter_factory import LABELS, make_adapter, tiny_base
from conftest import onebase_cli, write_spec
from onebase.serve.artifacts import AdapterError

KEY = {"Authorization": "Bearer test-key"}
ADMIN = {"Authorization": "Bearer admin-secret"}
ROWS = ["I love this so much", "worst service ever, never again", "the meeting is at noon", "meh"]
VERBALIZERS = {"negative": ["negative"], "neutral": ["neutral"], "positive": ["positive"]}


def fresh_base(path: Path):
    """The base loaded the plain way, apart from any server: the reference."""
    from transformers import AutoModelForCausalLM

    from onebase.model.build import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path)


def generation_program(base: Path, fingerprint: str, name: str = "echo-prompt"):
    from onebase.prompt import Demo, Program

    return Program(name=name, base=str(base), base_sha256=fingerprint, task="generation",
                   instruction="Repeat the last word.", demos=[Demo(input="red green blue", answer="blue"),
                                                               Demo(input="one two", answer="two")],
                   k=2, scoring="generate", max_new_tokens=6)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("prog-bases"), "llama")


@pytest.fixture(scope="module")
def fingerprint(base) -> str:
    from onebase.model.build import base_fingerprint

    return base_fingerprint(fresh_base(base)[0])


@pytest.fixture(scope="module")
def evaluated(ray_cluster, base, tmp_path_factory):
    """A 4-shot calibrated classification program, evaluated and registered by `onebase prompt eval`'s code."""
    from onebase.prompt.evaluate import evaluate_program, prepare
    from onebase.prompt.spec import load_program_spec

    root = tmp_path_factory.mktemp("prog-eval")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = {"kind": "prompt-program", "name": "sentiment-prompt", "base": str(base), "task": "classification",
            "labels": VERBALIZERS, "instruction": "Is the tweet negative, neutral or positive?",
            "data": {"source": "bundled:tweet-sentiment", "max_samples": 48, "validation": {"max_samples": 6}},
            "demos": {"k": 4, "selection": "balanced"}, "calibration": {"mode": "contextual"},
            "workers": 1, "cpus_per_worker": 1, "tracking": {"uri": uri}, "output": {"path": str(root / "out")}}
    path = write_spec(root / "program.yaml", spec)
    parsed = load_program_spec(path)
    result = evaluate_program(parsed, path.read_text(), tracking_uri=uri, echo=lambda *_: None)
    assert result.registered, "prompt eval registers the program"
    return {"uri": uri, "registered": result.registered, "queries": prepare(parsed).queries,
            "predictions": result.predictions, "export": result.export_dir}


@pytest.fixture(scope="module")
def server(serve_http, base, fingerprint, evaluated, tmp_path_factory):
    from ray import serve

    from onebase.prompt import save_program
    from onebase.serve.app import build
    from onebase.serve.client import Client

    root = tmp_path_factory.mktemp("prog-serving")
    generation = save_program(generation_program(base, fingerprint), root / "echo-prompt")
    lora = make_adapter(base, root / "chat-lora", "causal-lm", {"name": "lora", "r": 4}, seed=5)
    args = {"tracking_uri": evaluated["uri"],
            "bases": [{"name": str(base), "alias": "tiny-llama", "cpus": 0.5, "max_adapters": 8}],
            "adapters": [{"id": "echo-prompt", "source": str(generation)},
                         {"id": "chat-lora", "source": str(lora)}],
            "auth": {"api_keys": ["test-key"], "admin_token": "admin-secret"},
            "limits": {"max_prompt_tokens": 64, "max_tokens": 32, "max_inputs": 8}}
    serve.run(build(args), name="onebase-programs", route_prefix="/", blocking=False)
    url = serve_http  # the session's Serve instance (tests/conftest.py), shared with test_serve.py
    Client(url).wait_ready(180)
    yield {"url": url, "root": root, "generation": generation}
    serve.delete("onebase-programs")


def test_a_program_runs_on_the_engines_own_base_beside_an_adapter(base, fingerprint, tmp_path):
    """In-process: the program's runner uses the engine's base object, keeps its prefix cache, and a
    program made for another base is refused in one line."""
    from onebase.prompt import ProgramRunner, save_program
    from onebase.serve import programs
    from onebase.serve.artifacts import inspect
    from onebase.serve.engine import BaseEngine

    engine = BaseEngine(str(base))
    adapter = engine.load("chat-lora", inspect(make_adapter(base, tmp_path / "lora", "causal-lm",
                                                            {"name": "lora", "r": 4}, seed=5)))
    program = generation_program(base, fingerprint)
    loaded = programs.attach(engine, "echo-prompt", save_program(program, tmp_path / "echo"))
    assert loaded.program.model is engine.base and loaded.program.lm.cached  # no second copy; prefix cached
    assert {a.id for a in engine.adapters.values()} == {"chat-lora", "echo-prompt"} and adapter.runner.mixed
    model, tokenizer = fresh_base(base)
    assert loaded.program.generate(ROWS) == ProgramRunner(model, tokenizer, program, cache_prefix=False).generate(ROWS)
    other = program.model_copy(update={"base_sha256": "0" * 64})
    with pytest.raises(AdapterError, match="made for a different base") as refused:
        programs.attach(engine, "other", save_program(other, tmp_path / "other"))
    assert "\n" not in str(refused.value)
    from onebase.prompt.adapter import AdapterRef

    on_export = program.model_copy(update={"adapter": AdapterRef(path=str(tmp_path / "lora"), method="lora",
                                                                 base_model=str(base))})
    with pytest.raises(AdapterError, match="serves programs on its frozen base only"):  # never silently bare
        programs.attach(engine, "on-export", save_program(on_export, tmp_path / "on-export"))
    engine.unload(loaded)
    assert {a.id for a in engine.adapters.values()} == {"chat-lora"}


@pytest.mark.slow
def test_registered_program_loads_and_classifies_like_prompt_eval(server, evaluated, workspace):
    env = {"ONEBASE_URL": server["url"], "ONEBASE_API_KEY": "test-key", "ONEBASE_ADMIN_TOKEN": "admin-secret"}
    loaded = onebase_cli("adapters", "load", "sentiment-prompt", f"models:/{evaluated['registered']}",
                         cwd=workspace, env=env, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    queries, expected = evaluated["queries"], evaluated["predictions"]
    served = []
    for start in range(0, len(queries), 8):  # max_inputs per request
        r = requests.post(f"{server['url']}/v1/classify", headers=KEY, timeout=120,
                          json={"model": "sentiment-prompt", "input": queries[start: start + 8]})
        assert r.status_code == 200, r.text
        served += r.json()["data"]
    assert len(served) == len(expected) == len(queries)
    for got, want in zip(served, expected):
        assert got["label"] == want["answer"] and set(got["probabilities"]) == set(LABELS)
        for label in LABELS:
            assert got["probabilities"][label] == pytest.approx(want["probs"][label], abs=1e-4)


@pytest.mark.slow
def test_generation_program_answers_the_openai_client_like_a_fresh_runner(server, base):
    from openai import OpenAI

    from onebase.prompt import ProgramRunner, load_program

    client = OpenAI(base_url=f"{server['url']}/v1", api_key="test-key", max_retries=0)
    model, tokenizer = fresh_base(base)
    program = load_program(server["generation"])
    expected = ProgramRunner(model, tokenizer, program, cache_prefix=False).generate(ROWS[:2])
    # The program's own decoding applies; max_tokens only has to pass the endpoint's limit.
    chat = [client.chat.completions.create(model="echo-prompt", messages=[{"role": "user", "content": text}],
                                           max_tokens=16).choices[0].message.content for text in ROWS[:2]]
    assert chat == expected
    completion = client.completions.create(model="echo-prompt", prompt=ROWS[0], max_tokens=16)
    assert completion.choices[0].text == expected[0] and completion.usage.prompt_tokens > 10  # demos counted
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="echo-prompt", messages=[{"role": "user", "content": ROWS[0]}], max_tokens=16, stream=True))
    assert streamed == expected[0]
    # The bare base and the adapter answer on the same replica meanwhile.
    bare = client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=4, temperature=0)
    tuned = client.completions.create(model="chat-lora", prompt="Hello there", max_tokens=4, temperature=0)
    assert bare.choices[0].text != tuned.choices[0].text


@pytest.mark.slow
def test_models_lists_programs_with_their_kind_and_bad_calls_get_one_line_4xx(server, base, tmp_path):
    from onebase.prompt import save_program

    url = server["url"]
    listed = {m["id"]: m for m in requests.get(f"{url}/v1/models", headers=KEY, timeout=60).json()["data"]}
    assert listed["echo-prompt"]["kind"] == "prompt-program" and listed["echo-prompt"]["task"] == "generation"
    assert listed["chat-lora"]["kind"] == "adapter" and listed["tiny-llama"]["kind"] == "base"
    resident = requests.get(f"{url}/admin/adapters", headers=ADMIN, timeout=60).json()["resident_on_a_replica"]
    assert {"echo-prompt", "chat-lora"} <= set(resident["tiny-llama"])  # one replica holds both

    def refused(path: str, body: dict, headers=KEY) -> str:
        r = requests.post(f"{url}{path}", json=body, headers=headers, timeout=120)
        assert 400 <= r.status_code < 500, r.text
        message = r.json()["error"]["message"]
        assert "\n" not in message
        return message

    assert "generation program" in refused("/v1/classify", {"model": "echo-prompt", "input": ["hi"]})
    other = save_program(generation_program(base, "f" * 64, name="elsewhere"), tmp_path / "elsewhere")
    assert "not served" in refused("/admin/adapters", {"id": "elsewhere", "source": str(other)}, ADMIN)
    pinned = refused("/admin/adapters", {"id": "elsewhere", "source": str(other), "base": "tiny-llama"}, ADMIN)
    assert "different base" in pinned
    listed = {m["id"] for m in requests.get(f"{url}/v1/models", headers=KEY, timeout=60).json()["data"]}
    assert "elsewhere" not in listed
    if "sentiment-prompt" in listed:  # loaded by the registry test
        assert "classification program" in refused("/v1/chat/completions", {
            "model": "sentiment-prompt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
