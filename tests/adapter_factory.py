"""Tiny bases saved as HF model directories, and adapters of any method exported the way training does.

The adapters come from the method registry's own `apply` and `export` (the code `onebase run` uses),
with their trainable tensors moved off their initial values so that every adapter changes outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import TINY_BERT, TINY_LLAMA
from onebase.manifest import RunInfo, write_run_info
from onebase.methods import get_method, method_config
from onebase.model.assets import resolve_model
from onebase.model.build import AUTO_CLASSES, base_fingerprint, load_tokenizer

LABELS = ["negative", "neutral", "positive"]


def tiny_base(root: Path, kind: str) -> Path:
    """A tiny random BERT or Llama (bundled tokenizers) saved once under root/kind."""
    import transformers

    target = root / kind
    if (target / "config.json").is_file():
        return target
    source = TINY_BERT if kind == "bert" else TINY_LLAMA
    path = resolve_model(source["name"])
    config = transformers.AutoConfig.from_pretrained(path)
    for key, value in source["config_overrides"].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if kind == "llama" else transformers.AutoModel
    auto.from_config(config, dtype=torch.float32).save_pretrained(target)
    load_tokenizer(path).save_pretrained(target)
    return target


def make_adapter(base: Path, out: Path, task: str, method: dict, labels: list[str] | None = LABELS,
                 seed: int = 0, prompt: dict | None = None) -> Path:
    torch.manual_seed(seed)
    model = task_model(base, task, labels)
    fingerprint = base_fingerprint(model)
    config = method_config(method)
    tuned = get_method(config.name).apply(model, config, task)
    with torch.no_grad():
        for param in tuned.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    get_method(config.name).export(tuned, tuned.state_dict(), out)
    write_run_info(out, RunInfo(task=task, method=config.name, labels=labels if task != "causal-lm" else None,
                                base_model=str(base), base_fingerprint=fingerprint, prompt=prompt))
    return out


def llama_with_adapters(root: Path, methods: dict[str, dict], seed: int) -> tuple[Path, dict[str, Path]]:
    """A tiny llama base and one causal-LM adapter per named method on it (seeds from `seed` on)."""
    base = tiny_base(root, "llama")
    return base, {name: make_adapter(base, root / name, "causal-lm", method, seed=seed + i)
                  for i, (name, method) in enumerate(methods.items())}


def reference_model(base: Path, export: Path, task: str, labels: list[str] | None = LABELS):
    """The tuned model rebuilt the plain way: a fresh base from disk plus the method's own loader."""
    from onebase.methods import load_trained

    return load_trained(task_model(base, task, labels), export).eval()


def task_model(base: Path, task: str, labels: list[str] | None):
    """The base from disk with the task's head (a fresh one for classification)."""
    import transformers

    head = {}
    if labels is not None and task != "causal-lm":  # extractive QA has no labels (start and end logits)
        head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)}}
    model = getattr(transformers, AUTO_CLASSES[task]).from_pretrained(base, dtype=torch.float32, **head)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = load_tokenizer(str(base)).pad_token_id
    return model
