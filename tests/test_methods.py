"""The adapter zoo: every method trains through the one loop, exports, and reloads identically."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_BERT, TINY_LLAMA, tiny_spec
from onebase.errors import SpecError
from onebase.methods import METHODS, get_method, load_trained
from onebase.model.assets import resolve_model
from onebase.model.build import load_model
from onebase.spec import parse_spec
from onebase.train.launch import run_job

ALL = sorted(METHODS)
MINILM = {"name": "minilm"}
# Learning rates that move each kind of method within a few steps.
LR = {"full": 5e-5, "prompt": 3e-2, "ptuning": 3e-3, "prefix": 3e-3, "ia3": 1e-2, "bitfit": 5e-3,
      "adapterbias": 5e-3}
TASKS = {
    "sequence-classification": {"model": TINY_BERT},
    "token-classification": {"model": TINY_BERT},
    "extractive-qa": {"model": TINY_BERT},
    "causal-lm": {"model": TINY_LLAMA, "data": {"labels": ["a", "b"]}, "prompt": {"template": "chat"}},
}


def hidden_and_logits(model, probe: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"], output_hidden_states=True)
    width = probe["input_ids"].shape[1]  # soft prompts add positions in front; compare the real ones
    return out.hidden_states[-1][:, -width:], out.logits


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("method", ALL)
def test_every_method_and_task_exports_and_reloads_identically(method, task):
    """In-process (no Ray): apply, nudge the trained weights, export, reload on a fresh base."""
    if task not in METHODS[method].tasks:
        with pytest.raises(SpecError, match=f"method {method} does not support task {task}"):
            parse_spec(tiny_spec("x", task=task, method={"name": method}, **TASKS[task]))
        return
    if method == "bitfit" and task == "causal-lm":
        pytest.skip("the tiny causal base is Llama, which has no biases (rejected: see the bad-input test)")
    spec = parse_spec(tiny_spec("x", task=task, method={"name": method}, **TASKS[task]))
    labels = ["a", "b", "c"] if task in ("sequence-classification", "token-classification") else None
    path = resolve_model(spec.model.name)
    model = get_method(method).apply(load_model(spec, path, labels, 0), spec.method, task)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    ids = torch.randint(5, 1000, (2, 12))
    model.eval()
    before = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out = Path(tempfile.mkdtemp())
    get_method(method).export(model, model.state_dict(), out)
    (out / "onebase.json").write_text(json.dumps({"method": method}))
    reloaded = load_trained(load_model(spec, path, labels, 0), out).eval()
    after = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids))
    key = "start_logits" if task == "extractive-qa" else "logits"
    assert torch.equal(getattr(before, key), getattr(after, key))


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_each_method_trains_on_minilm_under_zero3(method, ray_cluster, workspace):
    """Bundled MiniLM, 2 workers, ZeRO-3: the export is complete, reloads identically, changes the base."""
    spec = tiny_spec(f"minilm-{method}", model=MINILM, method={"name": method}, deepspeed={"stage": 3},
                     data={"max_samples": 64, "validation": {"max_samples": 32}},
                     train={"max_steps": 3, "batch_size": 8, "learning_rate": LR.get(method, 2e-3),
                            "log_every_steps": 1},
                     tracking={"register_model": False})
    result = run_job(parse_spec(spec), json.dumps(spec))
    assert result.info["method"] == method and len(result.info["base_fingerprint"]) == 64
    weights = list(result.export_dir.glob("*.safetensors"))
    assert weights and all(t.numel() > 0 for w in weights for t in load_file(w).values())
    assert any("classifier" in name for w in weights for name in load_file(w))  # the head travels along
    trainable, total = result.info["trainable_params"], result.info["total_params"]
    assert (trainable == total) if method == "full" else (0 < trainable < 0.05 * total)

    parsed = parse_spec(spec)
    base = load_model(parsed, resolve_model("minilm"), result.info["labels"], None)
    probe = load_file(result.export_dir.parent / "probe.safetensors")
    base_hidden, _ = hidden_and_logits(base, probe)
    tuned = load_trained(load_model(parsed, resolve_model("minilm"), result.info["labels"], None),
                         result.export_dir)
    tuned_hidden, logits = hidden_and_logits(tuned, probe)
    assert torch.allclose(logits, probe["logits"], atol=1e-4)  # identical to the trained model
    assert (tuned_hidden - base_hidden).abs().max() > 1e-4  # the method changed what the base computes


@pytest.mark.parametrize(("method", "task", "model", "message"), [
    ("prompt", "token-classification", TINY_BERT, "method prompt does not support task token-classification"),
    ("ptuning", "extractive-qa", TINY_BERT, "method ptuning does not support task extractive-qa"),
])
def test_impossible_method_task_pairs_are_rejected_in_the_spec(method, task, model, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(tiny_spec("x", task=task, model=model, method={"name": method}))


@pytest.mark.parametrize(("method", "task", "message"), [
    ("bitfit", "causal-lm", "llama models have no bias terms"),
    ("prompt", "sequence-classification", "cannot classify with a decoder-only base"),
])
def test_bases_a_method_cannot_use_fail_before_ray(method, task, message, workspace):
    extra = {"data": {"labels": ["a", "b"]}, "prompt": {"template": "chat"}} if task == "causal-lm" else {}
    spec = parse_spec(tiny_spec("x", task=task, model=TINY_LLAMA, method={"name": method}, **extra))
    with pytest.raises(SpecError, match=message):
        run_job(spec, "")


def test_a_hyperparameter_of_another_method_is_rejected():
    with pytest.raises(SpecError, match=r"method: r: unknown field \(for method ia3\)"):
        parse_spec(tiny_spec("x", method={"name": "ia3", "r": 8}))
