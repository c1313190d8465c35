"""Training on a real local Ray with real DeepSpeed (gloo) and a real MLflow sqlite store."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import TINY_BERT, TINY_LLAMA, tiny_spec
from onebase.data.prepare import IGNORE, prompt_ids
from onebase.data.sources import load_dataset
from onebase.errors import ClusterError, OnebaseError
from onebase.model.build import load_tokenizer
from onebase.spec import parse_spec
from onebase.train.launch import run_job
from onebase.train.loop import make_loader


def train(spec: dict):
    parsed = parse_spec(spec)
    return run_job(parsed, json.dumps(spec))


def reload_and_compare(result, spec: dict) -> float:
    """Load the export with plain transformers / PEFT; max |logit diff| against training-time outputs."""
    import transformers
    from peft import PeftModel

    from onebase.model.assets import resolve_model
    from onebase.model.build import AUTO_CLASSES, load_model

    parsed = parse_spec(spec)
    probe = load_file(result.export_dir.parent / "probe.safetensors")
    if (result.export_dir / "adapter_config.json").is_file():
        # A random-init base is rebuilt from the same config and seed; a pretrained one is just loaded.
        base = load_model(parsed, resolve_model(parsed.model.name), result.info["labels"], None)
        model = PeftModel.from_pretrained(base, result.export_dir)
    else:
        model = getattr(transformers, AUTO_CLASSES[parsed.task]).from_pretrained(result.export_dir)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    return float((logits[..., : probe["logits"].shape[-1]] - probe["logits"]).abs().max())


def test_full_finetune_zero2_two_workers_loss_down_and_registered(ray_cluster, workspace):
    spec = tiny_spec("tiny-full-zero2", deepspeed={"stage": 2}, train={"epochs": 2, "learning_rate": 3e-3})
    result = train(spec)
    losses = [m.value for m in sorted(MlflowClient().get_metric_history(result.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) >= 4 and min(losses[-2:]) < losses[0]
    assert (result.export_dir / "model.safetensors").is_file() and (result.export_dir / "config.json").is_file()
    assert reload_and_compare(result, spec) < 1e-4
    name, version = result.registered.split("/")
    tags = MlflowClient().get_model_version(name, version).tags
    assert tags["method"] == "full" and len(tags["base_sha256"]) == 64 and len(tags["dataset_sha256"]) == 64
    assert int(tags["trainable_params"]) == result.info["total_params"]
    assert {"accuracy", "macro_f1", "eval_loss"} <= set(result.metrics)


def test_lora_zero3_two_workers_exports_a_plain_peft_adapter(ray_cluster, workspace, capsys):
    spec = tiny_spec("tiny-lora-zero3", deepspeed={"stage": 3},
                     method={"name": "lora", "r": 4, "target_modules": ["query", "value"]},
                     train={"epochs": 2, "learning_rate": 5e-3, "eval_every_steps": 4})
    result = train(spec)
    # The driver's console, fed by rank 0 (not a terminal here: plain lines every log_every_steps).
    console = capsys.readouterr().out.splitlines()
    steps = [line for line in console if line.startswith("[onebase] step ")]
    assert steps[0].startswith("[onebase] step 2/12 ") and steps[-1].startswith("[onebase] step 12/12 (100%)")
    assert any(line.startswith("[onebase] eval at step 4: eval_loss ") for line in console)
    assert any(line.startswith("[onebase] final eval at step 12: ") for line in console)
    assert any(line.startswith("mlflow run: ") and result.run_id in line for line in console)
    adapter = load_file(result.export_dir / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # ZeRO-3 did not save empty tensors
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in adapter.items())  # B starts at 0: it trained
    assert any("classifier" in k for k in adapter)  # the head travels with the adapter
    assert json.loads((result.export_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert reload_and_compare(result, spec) < 1e-4
    client = MlflowClient()
    assert client.get_metric_history(result.run_id, "accuracy")[0].step == 4  # periodic eval logged
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    version = client.get_model_version(*result.registered.split("/"))
    assert version.tags["method"] == "lora" and float(version.tags["trainable_percent"]) < 5


def test_worker_failure_restarts_from_last_checkpoint(ray_cluster, workspace, monkeypatch):
    monkeypatch.setenv("ONEBASE_FAIL_AT_STEP", "5")
    spec = tiny_spec("tiny-failover", deepspeed={"stage": 2}, checkpoint={"every_steps": 4},
                     train={"max_steps": 8}, scaling={"num_workers": 2, "max_failures": 1})
    result = train(spec)
    resumed = MlflowClient().get_metric_history(result.run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [4.0]
    assert result.metrics["eval_samples"] == 64


def test_stopped_run_continues_with_resume(ray_cluster, workspace, monkeypatch):
    spec = tiny_spec("tiny-resume", deepspeed={"stage": 3}, checkpoint={"every_steps": 3},
                     train={"max_steps": 6}, scaling={"num_workers": 2, "max_failures": 0})
    monkeypatch.setenv("ONEBASE_FAIL_AT_STEP", "4")
    with pytest.raises(OnebaseError, match="injected failure at step 4"):
        train(spec)
    monkeypatch.delenv("ONEBASE_FAIL_AT_STEP")
    first_run = json.loads((workspace / "runs" / "tiny-resume" / "latest.json").read_text())["mlflow_run_id"]
    assert MlflowClient().get_run(first_run).info.status == "FAILED"
    result = run_job(parse_spec(spec), "", resume=True)
    assert result.run_id == first_run
    assert [m.value for m in MlflowClient().get_metric_history(result.run_id, "resumed_from_step")] == [3.0]
    assert MlflowClient().get_run(first_run).info.status == "FINISHED"


def test_causal_lm_lora_learns_response_tokens_only(ray_cluster, workspace):
    spec = tiny_spec("tiny-causal", task="causal-lm", model=TINY_LLAMA,
                     data={"labels": ["negative", "neutral", "positive"], "max_length": 64},
                     prompt={"template": "chat", "instruction": "Sentiment of this tweet? One word."},
                     method={"name": "lora", "r": 4}, deepspeed={"stage": 2},
                     train={"epochs": 1, "learning_rate": 5e-3}, scaling={"num_workers": 1})
    result = train(spec)
    assert {"exact_match", "perplexity", "eval_loss"} <= set(result.metrics)
    assert reload_and_compare(result, spec) < 1e-4
    # What the workers trained on: the same rows, tokenizer and loader as the loop, batch by batch.
    parsed = parse_spec(spec)
    tokenizer = load_tokenizer(str(result.export_dir))
    dataset = load_dataset(parsed)
    loader, _ = make_loader(parsed, tokenizer, dataset.train, dataset.labels, rank=0, world=1, train=True)
    checked = 0
    for batch in loader:
        for row, ids, labels, mask in zip(batch["index"].tolist(), batch["input_ids"], batch["labels"],
                                          batch["attention_mask"]):
            response = tokenizer(dataset.train[row]["response"], add_special_tokens=False)["input_ids"]
            response += [tokenizer.eos_token_id]
            end = int(mask.sum())  # right-padded: the row's tokens, then padding
            start = end - len(response)
            assert ids[start:end].tolist() == response
            assert labels[start:end].tolist() == response, "every response token (EOS included) is a target"
            assert (labels[:start] == IGNORE).all(), "no prompt token is a target"
            assert (labels[end:] == IGNORE).all(), "no padding is a target"
            # ... after the rendered prompt (its end, when max_length cuts a long tweet).
            assert ids[:start].tolist() == prompt_ids(parsed, tokenizer, dataset.train[row])[-start:]
            checked += 1
    assert checked == len(dataset.train)


def test_impossible_resources_fail_fast(ray_cluster, workspace):
    spec = tiny_spec("too-big", scaling={"num_workers": 3, "resources_per_worker": {"CPU": 1}})
    with pytest.raises(ClusterError, match="do not fit the cluster"):
        train(spec)
    gpu = tiny_spec("no-gpu", scaling={"num_workers": 1, "use_gpu": True})
    with pytest.raises(ClusterError, match="GPU"):
        train(gpu)


def test_console_draws_what_rank_0_sends(ray_cluster):
    """A bar on a terminal, plain lines elsewhere; evaluation results as they come, in both."""
    import io

    from onebase.train.console import Console, ProgressBoard

    for live in (False, True):
        board, out = ProgressBoard.remote(), io.StringIO()
        with Console(board, log_every=2, out=out, live=live):
            for step in range(1, 5):
                board.push.remote({"kind": "step", "step": step, "total": 4, "loss": 1.0 / step, "lr": 1e-3,
                                   "tokens_per_s": 1000.0, "samples_per_s": 10.0})
            board.push.remote({"kind": "eval", "step": 4, "metrics": {"accuracy": 0.75}, "final": True})
        text = out.getvalue()
        assert "[onebase] final eval at step 4: accuracy 0.75" in text
        if live:
            assert "4/4" in text and "loss 0.2500" in text and "\r" in text  # tqdm redraws one line
        else:
            assert [line.split(" |")[0] for line in text.splitlines()[:2]] == ["[onebase] step 2/4 ( 50%)",
                                                                             "[onebase] step 4/4 (100%)"]


@pytest.fixture(scope="module")
def tiny_pretrained(workspace):
    """A tiny BERT saved as a pretrained model (head included, no dropout): every weight comes from disk,
    so two runs differ only in how they were partitioned."""
    import transformers

    from onebase.model.assets import resolve_model

    path = workspace / "tiny-bert-pretrained"
    config = transformers.AutoConfig.from_pretrained(
        resolve_model("minilm"), **TINY_BERT["config_overrides"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"}, label2id={"negative": 0, "neutral": 1, "positive": 2})
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(resolve_model("minilm")).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.async_io
def test_zero3_partitioned_loading_with_offload_matches_zero0(ray_cluster, workspace, tiny_pretrained, tmp_path):
    """ZeRO-3 builds the model inside deepspeed.zero.Init (each of 2 workers holds half of it), with
    parameters and optimizer offloaded to CPU, and trains to the export ZeRO-0 gets from the same
    weights and seed; so does ZeRO-2 with its optimizer states offloaded to CPU, and ZeRO-3 with both
    offloaded to NVMe, whose zero.Init loads the weights straight into shards kept on disk."""
    runs = {}
    for key, stage, offload in ((0, 0, False), (3, 3, "cpu"), (2, 2, "cpu"), ("nvme", 3, "nvme")):
        spec = tiny_spec(f"tiny-load-z{key}", train={"max_steps": 4, "log_every_steps": 1},
                         deepspeed={"stage": stage, "offload_param": offload if stage == 3 else False,
                                    "offload_optimizer": offload,
                                    "nvme_path": str(tmp_path) if offload == "nvme" else None})
        spec["model"] = {"name": str(tiny_pretrained), "init": "pretrained"}
        runs[key] = train(spec)
    client = MlflowClient()
    params = {s: client.get_run(r.run_id).data.params for s, r in runs.items()}
    assert params[3]["partitioned_loading"] == "True" and params[0]["partitioned_loading"] == "False"
    assert params[2]["deepspeed.offload_optimizer"] == params[3]["deepspeed.offload_param"] == "cpu"
    held = {s: client.get_metric_history(r.run_id, "loaded_param_mb_per_worker")[0].value for s, r in runs.items()}
    assert held[3] < 0.6 * held[0]  # each of the 2 workers loaded about half
    assert held["nvme"] < 0.2 * held[3]  # all but the shards under DeepSpeed's 1 MB aio minimum on disk
    losses = {s: [m.value for m in sorted(client.get_metric_history(r.run_id, "loss"), key=lambda m: m.step)]
              for s, r in runs.items()}
    for offloaded in (3, 2, "nvme"):
        assert losses[offloaded] == pytest.approx(losses[0], abs=1e-5), offloaded  # the first step's included
    assert runs[3].info["base_fingerprint"] == runs["nvme"].info["base_fingerprint"] == runs[0].info["base_fingerprint"]
    exported = {s: load_file(r.export_dir / "model.safetensors") for s, r in runs.items()}
    assert exported[3].keys() == exported["nvme"].keys() == exported[0].keys()
    for offloaded in (3, 2, "nvme"):
        assert max(float((exported[offloaded][k] - exported[0][k]).abs().max()) for k in exported[0]) < 1e-5
    assert any(float((exported[0][k] - t).abs().max()) > 1e-4 for k, t in load_file(
        tiny_pretrained / "model.safetensors").items() if k in exported[0])  # it did train


@pytest.mark.slow
@pytest.mark.async_io
def test_zero3_nvme_offload_trains_as_cpu_offload_does(ray_cluster, workspace, tmp_path, capsys):
    """ZeRO-3 on 2 workers with parameters and optimizer states offloaded to NVMe (files under
    `nvme_path`, through DeepSpeed's async_io op: libaio) trains to the losses and export the same
    seed gets offloading both to CPU memory (within 1e-5; 4e-7 apart when this was written).
    The model is just big enough (4 layers, 1 MB MLP shards) for DeepSpeed to swap more parameters
    than it has swap buffers during each forward. Parameters and optimizer states were on disk, not
    in memory (`nvme_swap_mb_per_worker` is measured from the swap files before they are removed),
    and the job's swap folder is gone afterwards."""
    from onebase.cli import main

    swap = tmp_path / "nvme"
    swap.mkdir()
    model = {**TINY_BERT, "config_overrides": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                               "intermediate_size": 2048}}
    runs = {}
    for device in ("cpu", "nvme"):
        spec = tiny_spec(f"tiny-offload-{device}", model=model, train={"max_steps": 4, "log_every_steps": 1},
                         deepspeed={"stage": 3, "offload_param": device, "offload_optimizer": device,
                                    "nvme_path": str(swap) if device == "nvme" else None})
        if device == "nvme":
            path = workspace / "tiny-offload-nvme.yaml"
            path.write_text(json.dumps(spec))  # YAML is a superset of JSON
            assert main(["validate", str(path)]) == 0, capsys.readouterr().err
        runs[device] = train(spec)
    client = MlflowClient()
    data = {d: client.get_run(r.run_id).data for d, r in runs.items()}
    nvme_params = data["nvme"].params
    assert nvme_params["deepspeed.offload_param"] == nvme_params["deepspeed.offload_optimizer"] == "nvme"
    losses = {d: [m.value for m in sorted(client.get_metric_history(r.run_id, "loss"), key=lambda m: m.step)]
              for d, r in runs.items()}
    assert len(losses["nvme"]) == 4 and losses["nvme"] == pytest.approx(losses["cpu"], abs=1e-5)
    exported = {d: load_file(r.export_dir / "model.safetensors") for d, r in runs.items()}
    assert exported["nvme"].keys() == exported["cpu"].keys()
    assert max(float((exported["nvme"][k] - exported["cpu"][k]).abs().max()) for k in exported["cpu"]) < 1e-5
    held = {d: {k: data[d].metrics[f"{k}_mb_per_worker"] for k in ("param", "optimizer_state")} for d in runs}
    for kind in ("param", "optimizer_state"):  # all but the shards under DeepSpeed's 1 MB aio minimum
        assert held["nvme"][kind] < 0.2 * held["cpu"][kind], (kind, held)
    assert data["nvme"].metrics["nvme_swap_mb_per_worker"] > sum(held["cpu"].values())  # + gradients
    assert "nvme_swap_mb_per_worker" not in data["cpu"].metrics
    assert list(swap.iterdir()) == []
