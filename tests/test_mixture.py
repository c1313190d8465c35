"""Instruction tuning and the generalist it makes: a prompt program on base + a training export
(`adapter:`), on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

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

    recorded = build_program(spec, [], ["negative", "neutral", "positive"], base_fingerprint(bare))
    meta = manifest(recorded)
    assert meta["adapter"]["path"] == str(export) and meta["adapter"]["method"] == "lora"
    assert meta["adapter"]["base_fingerprint"] == meta["base_sha256"] == json.loads(
        (export / "onebase.json").read_text())["base_fingerprint"]


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
