"""The user flow on the bundled MiniLM: `onebase run` from the command line, then reuse the adapter."""

from __future__ import annotations

import json
import re

import pytest
import torch
from mlflow.tracking import MlflowClient
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import REPO, onebase_cli


@pytest.mark.slow
def test_onebase_run_on_bundled_minilm_registers_a_reloadable_adapter(workspace):
    result = onebase_cli("run", str(REPO / "jobs" / "tweet-sentiment-lora.yaml"),
                         "--set", "data.max_samples=320", "--set", "data.validation.max_samples=96",
                         "--set", "train.epochs=1", "--set", "train.eval_every_steps=5",
                         "--set", "name=minilm-cli", cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert re.search(r"\[onebase\] step 10/10 \(100%\) \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d,]+ tok/s .* ETA", out)
    assert re.search(r"^\[onebase\] eval at step 5: .*macro_f1 [\d.]+", out, re.M)  # shown as it comes
    assert "eval: {" in result.stdout and "macro_f1" in result.stdout
    registered = re.search(r"^registered: (\S+)/(\d+)$", result.stdout, re.M)
    assert registered, result.stdout

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    version = MlflowClient(tracking_uri=uri).get_model_version(registered[1], registered[2])
    assert version.tags["base_model"] == "minilm" and version.tags["method"] == "lora"

    export = workspace / "runs" / "minilm-cli" / "export"
    info = json.loads((export / "onebase.json").read_text())
    from onebase.model.assets import minilm_path
    from onebase.model.build import base_fingerprint

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    assert base_fingerprint(base) == info["base_fingerprint"] == version.tags["base_sha256"]
    probe = load_file(workspace / "runs" / "minilm-cli" / "probe.safetensors")
    with torch.no_grad():
        before = base(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        model = PeftModel.from_pretrained(base, export).eval()  # plain PEFT, nothing from onebase
        after = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.allclose(after, probe["logits"], atol=1e-4)
    assert not torch.allclose(before, after, atol=1e-3)  # the adapter changes the base's outputs


@pytest.mark.slow
def test_chat_sft_on_bundled_smollm2(workspace):
    result = onebase_cli("run", str(REPO / "jobs" / "chat-smollm2-lora.yaml"),
                         "--set", "data.max_samples=48", "--set", "data.validation.max_samples=16",
                         "--set", "train.max_steps=3", "--set", "train.log_every_steps=1",
                         "--set", "tracking.register_model=false", cwd=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[onebase] step 3/3 (100%)" in result.stdout + result.stderr
    info = json.loads((workspace / "runs" / "chat-smollm2-lora" / "export" / "onebase.json").read_text())
    assert info["task"] == "causal-lm" and info["metrics"]["perplexity"] > 1
    assert 0 < info["trainable_params"] < 0.02 * info["total_params"]
    assert "registered:" not in result.stdout
