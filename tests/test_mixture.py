"""Instruction tuning and the generalist it makes: a prompt program on base + a training export
(`adapter:`), on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
import yaml
from test_prompt import run_bad_cases

from adapter_factory import make_adapter, reference_model, tiny_base

LABELS = {"negative": ["negative"], "neutral": ["neutral"], "positive": ["positive"]}
LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny Llama saved as a model dir, and a causal-LM LoRA export trained (perturbed) on it."""
    root = tmp_path_factory.mktemp("mixture")
    base = tiny_base(root, "llama")
    export = make_adapter(base, root / "lora-export", "causal-lm", LORA, labels=None)
    return base, export


def program(base, name: str, **fields) -> dict:
    return {"kind": "prompt-program", "name": name, "base": str(base), "task": "classification",
            "labels": LABELS, "instruction": "Classify the sentiment of this tweet.",
            "data": {"source": "bundled:tweet-sentiment", "max_samples": 60,
                     "validation": {"fraction": 0.2, "seed": 42, "max_samples": 8}}, **fields}


def test_a_program_runs_on_its_base_with_the_export_merged_in(tuned):
    from onebase.model.build import base_fingerprint
    from onebase.prompt.artifact import manifest
    from onebase.prompt.demos import build_program
    from onebase.prompt.spec import parse_program_spec
    from onebase.prompt.worker import load_bare_base, load_base

    base, export = tuned
    spec = parse_program_spec(program(base, "on-lora", adapter=str(export)))
    model, tokenizer = load_base(spec, str(base))
    bare, _ = load_bare_base(spec, str(base))
    ids = tokenizer(["I love this", "awful day"], return_tensors="pt", padding=True)
    with torch.no_grad():
        merged = model(**ids).logits
        plain_peft = reference_model(base, export, "causal-lm", None)(**ids).logits
        untuned = bare(**ids).logits
    # Merged weights compute what the PEFT-wrapped model computes, and not what the bare base does.
    torch.testing.assert_close(merged, plain_peft, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged, untuned, atol=1e-3)
    assert all(not p.requires_grad for p in model.parameters())

    recorded = build_program(spec, [], list(LABELS), base_fingerprint(bare))
    meta = manifest(recorded)
    assert meta["adapter"]["path"] == str(export) and meta["adapter"]["method"] == "lora"
    assert meta["adapter"]["base_fingerprint"] == meta["base_sha256"] == json.loads(
        (export / "onebase.json").read_text())["base_fingerprint"]


@pytest.mark.parametrize("method", [{"name": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                                     "feedforward_modules": ["down_proj"]}, {"name": "full"}],
                         ids=["ia3", "full"])
def test_other_exports_run_as_their_method_rebuilds_them(tuned, tmp_path, method):
    """IA3 is merged like LoRA; a full fine-tune's export is the model itself."""
    from onebase.prompt.spec import parse_program_spec
    from onebase.prompt.worker import load_base

    base, _ = tuned
    export = make_adapter(base, tmp_path / method["name"], "causal-lm", method, labels=None)
    model, tokenizer = load_base(parse_program_spec(program(base, "other", adapter=str(export))), str(base))
    ids = tokenizer(["I love this"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits,
                                   reference_model(base, export, "causal-lm", None)(**ids).logits,
                                   atol=1e-4, rtol=1e-4)
    assert type(model).__name__ == "LlamaForCausalLM"  # plain weights: no PEFT wrapper left


@pytest.mark.slow
def test_eval_on_an_adapter_records_it_and_refuses_another_base(workspace, ray_cluster, tuned):
    from mlflow.tracking import MlflowClient

    from onebase.cli import main
    from onebase.errors import OnebaseError
    from onebase.prompt.evaluate import evaluate_program
    from onebase.prompt.spec import parse_program_spec

    base, export = tuned
    uri = f"sqlite:///{workspace / 'mixture-adapter.db'}"
    path = workspace / "on-lora.yaml"
    path.write_text(yaml.safe_dump(program(base, "on-lora", adapter=str(export), output={
        "path": str(workspace / "runs")}, tracking={"experiment": "mixture", "registered_model": "on-lora"})))
    assert main(["prompt", "eval", str(path), "--tracking-uri", uri]) == 0
    saved = json.loads((workspace / "runs" / "on-lora" / "program" / "onebase.json").read_text())
    assert saved["adapter"]["method"] == "lora" and saved["adapter"]["path"] == str(export)
    tags = MlflowClient(tracking_uri=uri).get_model_version("on-lora", "1").tags
    assert tags["adapter_method"] == "lora" and tags["adapter_sha256"] == saved["adapter"]["export_sha256"]

    # Same base name, other weights: caught once the workers hold the base, as one line.
    forged = workspace / "forged-export"
    shutil.copytree(export, forged)
    info = json.loads((forged / "onebase.json").read_text())
    (forged / "onebase.json").write_text(json.dumps({**info, "base_fingerprint": "0" * 64}))
    spec = parse_program_spec(program(base, "forged", adapter=str(forged)))
    with pytest.raises(OnebaseError, match="adapter: .* was trained on a base with fingerprint 000000000000"):
        evaluate_program(spec, "", tracking_uri=uri, register=False)


def test_bad_adapters_fail_in_one_line_before_ray(workspace, tuned):
    base, export = tuned
    other = workspace / "other-base-export"
    shutil.copytree(export, other, dirs_exist_ok=True)
    info = json.loads((export / "onebase.json").read_text())
    (other / "onebase.json").write_text(json.dumps({**info, "base_model": "minilm"}))
    prefix = workspace / "prefix-export"
    prefix.mkdir(exist_ok=True)
    (prefix / "onebase.json").write_text(json.dumps({**info, "method": "prefix"}))
    classifier = workspace / "cls-export"
    classifier.mkdir(exist_ok=True)
    (classifier / "onebase.json").write_text(json.dumps({**info, "task": "sequence-classification"}))
    cases = {
        "missing": (str(workspace / "nope"), "is not a directory"),
        "not-an-export": (str(base), "has no readable onebase.json"),
        "other-base": (str(other), "was trained on base minilm, not on this program's base"),
        "prefix": (str(prefix), "method prefix cannot run under a program"),
        "classifier": (str(classifier), "is a sequence-classification export"),
    }
    results = run_bad_cases(workspace, {name: program(base, f"bad-{name}", adapter=path)
                                        for name, (path, _) in cases.items()})
    for name, (_, expected) in cases.items():
        rc, lines = results[name]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("onebase: error: adapter: "), (name, lines)
        assert expected in lines[0], (name, lines[0])


# --- data.mixture and evaluation.held_out in job specs --------------------------------------------------

PHRASINGS = ["Solve it.", "Answer with a number.", "What is the result?"]


def mixture_job(name: str, workspace, **changes) -> dict:
    """A causal-LM LoRA job on a tiny random Llama over chat pairs + generated arithmetic, holding out
    tweet sentiment (labels) and coin flips (an extractor)."""
    from conftest import TINY_LLAMA

    spec = {
        "name": name, "task": "causal-lm", "model": TINY_LLAMA,
        "data": {"source": "mixture", "max_samples": 48, "max_length": 64,
                 "validation": {"fraction": 0.1, "seed": 42, "max_samples": 4},
                 "mixture": [{"name": "chat", "source": "bundled:chat-pairs", "max_samples": 40, "weight": 1},
                             {"source": "bundled:arithmetic?n=60&steps=1", "instruction": PHRASINGS, "weight": 2,
                              "template": "Q: {instruction} {input}\nA:"}]},
        "prompt": {"template": "chat"},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "log_every_steps": 2},
        "scaling": {"num_workers": 1}, "deepspeed": {"stage": 2},
        "evaluation": {"held_out": [
            {"name": "sentiment", "labels": LABELS, "instruction": "Sentiment? One word.",
             "data": {"source": "bundled:tweet-sentiment", "max_samples": 60,
                      "validation": {"fraction": 0.1, "seed": 42, "max_samples": 6}}},
            {"data": {"source": "bundled:coin-flip?n=20", "validation": {"fraction": 0.2, "max_samples": 4}},
             "extractor": {"kind": "first-line"}, "scoring": "generate", "max_new_tokens": 3,
             "instruction": "Answer yes or no."}]},
        "tracking": {"uri": f"sqlite:///{workspace / 'mixture.db'}", "experiment": "mixture"},
        "output": {"path": str(workspace / "runs")},
    }
    spec.update(changes)
    return spec


def test_a_mixture_is_weighted_capped_phrased_and_split_per_source(workspace):
    from collections import Counter

    from onebase.data.sources import load_dataset
    from onebase.spec import parse_spec

    spec = parse_spec(mixture_job("mix-data", workspace))
    dataset = load_dataset(spec)
    by_source = Counter(row["source"] for row in dataset.train)
    # 48 rows shared 1:2; chat's cap (40 distinct rows) is not reached, arithmetic's 54 training rows neither.
    assert by_source == {"chat": 16, "arithmetic": 32}
    assert Counter(row["source"] for row in dataset.validation) == {"chat": 4, "arithmetic": 4}
    train_inputs = {(r["source"], r.get("input"), r.get("instruction")) for r in dataset.train}
    assert not train_inputs & {(r["source"], r.get("input"), r.get("instruction")) for r in dataset.validation}
    arithmetic = [r for r in dataset.train if r["source"] == "arithmetic"]
    assert {r["instruction"] for r in arithmetic} == set(PHRASINGS)  # drawn per row, every phrasing used
    assert all(r["template"] == "Q: {instruction} {input}\nA:" for r in arithmetic)
    assert all("template" not in r and r["instruction"] for r in dataset.train if r["source"] == "chat")
    assert load_dataset(spec).fingerprint() == dataset.fingerprint()  # seeded: the same rows every time

    # A heavier weight than a source's cap repeats its rows; the cap bounds the distinct rows.
    capped = mixture_job("mix-cap", workspace)
    capped["data"]["mixture"][0].update({"max_samples": 5, "weight": 3})
    capped["data"]["mixture"][1]["weight"] = 1
    rows = [r for r in load_dataset(parse_spec(capped)).train if r["source"] == "chat"]
    assert len(rows) == 36 and len({r["instruction"] for r in rows}) == 5


def test_bad_mixtures_and_held_out_tasks_fail_in_one_line_before_ray(workspace):
    from test_bad_input import assert_one_line_exit_2, ray_sessions, run_batch

    no_response = workspace / "no-response.csv"
    no_response.write_text("question,answer\nhi,hello\nbye,ciao\n")
    first_source = {"source": str(no_response), "columns": {"instruction": "question"}}

    def job(name: str, data=None, **changes) -> dict:
        spec = mixture_job(name, workspace, **changes)
        spec["data"].update(data or {})
        return spec

    cases = {
        "missing-column": (job("b1", {"mixture": [first_source]}),
                           "data.mixture[0].columns.response: column 'response' not in no-response.csv"),
        "not-causal": (job("b2", task="sequence-classification"),
                       "data.mixture: instruction-tuning mixtures train causal-lm, not sequence-classification"),
        "empty": (job("b3", {"mixture": []}), "data.mixture: List should have at least 1 item"),
        "zero-weight": (job("b4", {"mixture": [{"source": "bundled:chat-pairs", "weight": 0}]}),
                        "data.mixture.0.weight: Input should be greater than 0"),
        "no-mixture": (job("b5", {"mixture": None}), "data.source: mixture needs data.mixture"),
        "held-out-unscored": (job("b6", evaluation={"held_out": [
            {"name": "bare", "data": {"source": "bundled:tweet-sentiment"}}]}),
            "evaluation.held_out.0: a held-out task needs labels (with their verbalizers) or an extractor"),
        "held-out-verbalizer": (job("b7", evaluation={"held_out": [
            {"data": {"source": "bundled:tweet-sentiment"}, "labels": {**LABELS, "neutral": []}}]}),
            "evaluation.held_out[0] (tweet-sentiment): labels: label 'neutral' has no verbalizer"),
    }
    del cases["not-causal"][0]["prompt"]  # else the prompt block is what it names first
    paths = []
    for name, (spec, _) in cases.items():
        paths.append(workspace / f"bad-mixture-{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(spec, sort_keys=False))
    results, ray_tmp = run_batch(workspace, [[command, str(p)] for command in ("validate", "run") for p in paths])
    for result, (name, (_, expected)) in zip(results, [*cases.items(), *cases.items()]):
        line = assert_one_line_exit_2(result) or result["stderr"]
        assert expected in line, (name, line)
    assert not ray_sessions(ray_tmp)


@pytest.mark.slow
def test_a_mixture_job_trains_and_scores_held_out_tasks_tuned_and_base(workspace, ray_cluster, monkeypatch):
    """`onebase run` on a mixture with held-out tasks: per-source eval, held-out figures for the tuned
    model and the base in the summary, the MLflow run and onebase.json; each equals what
    `onebase prompt eval` computes for the same program on the base and on base + export."""
    from mlflow.tracking import MlflowClient

    from onebase.prompt.evaluate import evaluate_program, prepare
    from onebase.spec import parse_spec
    from onebase.train import heldout
    from onebase.train.heldout import program_spec
    from onebase.train.launch import print_summary, run_job

    prepared = []  # each held-out task's rows are loaded once (pre-flight), then scored after training
    monkeypatch.setattr(heldout, "prepare", lambda spec: prepared.append(spec.name) or prepare(spec))
    spec = mixture_job("tiny-flan", workspace)
    said: list[str] = []
    summary = io.StringIO()
    print_summary(run_job(parse_spec(spec), yaml.safe_dump(spec), echo=said.append, progress=False), out=summary)
    assert sorted(prepared) == ["tiny-flan-heldout-coin-flip", "tiny-flan-heldout-sentiment"]
    out = "\n".join(said) + summary.getvalue()  # what `onebase run` prints
    assert "held-out: scoring sentiment, coin-flip zero-shot on the tuned model and on the base" in out
    assert "held-out sentiment (6 rows): accuracy " in out and "(base " in out
    assert "held-out coin-flip (4 rows): exact_match " in out

    export = workspace / "runs" / "tiny-flan" / "export"
    info = json.loads((export / "onebase.json").read_text())
    held = info["held_out"]
    assert set(held) == {"sentiment", "coin-flip"}
    assert {"accuracy", "macro_f1"} <= set(held["sentiment"]["tuned"]) & set(held["sentiment"]["base"])
    assert "exact_match" in held["coin-flip"]["tuned"] and "exact_match" in held["coin-flip"]["base"]

    uri = spec["tracking"]["uri"]
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("mixture").experiment_id])[0]
    logged = run.data.metrics
    for side, prefix in (("tuned", "heldout"), ("base", "heldout_base")):
        for task, metrics in held.items():
            for metric, value in metrics[side].items():
                if metric not in ("ms_per_query",):
                    assert logged[f"{prefix}/{task}/{metric}"] == pytest.approx(value)
    assert {"mixture/chat/eval_loss", "mixture/arithmetic/eval_loss", "mixture/arithmetic/perplexity"} <= set(logged)
    # The registered artifact is the export with the held-out figures in it.
    local = client.download_artifacts(run.info.run_id, "adapter/onebase.json", str(workspace / "dl-flan"))
    assert json.loads(open(local).read())["held_out"] == held

    # Same rows, same programs, through `onebase prompt eval`'s own path: identical figures.
    job = parse_spec(spec)
    for side, adapter in (("base", None), ("tuned", str(export))):
        program = program_spec(job, 0, job.evaluation.held_out[0], adapter)
        again = evaluate_program(program, "", tracking_uri=uri, register=False, echo=lambda *_: None).metrics
        for metric in ("accuracy", "macro_f1", "eval_samples"):
            assert again[metric] == pytest.approx(held["sentiment"][side][metric]), (side, metric)
