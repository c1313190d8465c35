"""Load a base model with the task's head (pretrained weights, or random init from config)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from onebase.spec.schema import JobSpec
from onebase.tasks import AUTO_CLASSES, TASKS

# Output heads shared with the input embeddings are not a task head: they stay frozen.
TIED_HEADS = frozenset({"lm_head"})


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often have no pad token; padding is masked out, any id works.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_class(task: str):
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def model_config(spec: JobSpec, path: str, labels: list[str] | None):
    """The HF config the job's model is built from: the task head's labels, and for random init the
    spec's config_overrides (ValueError naming a field the architecture does not have)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, revision=spec.model.revision, **head_kwargs(spec, labels))
    for key, value in spec.model.config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model.config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    return config


def head_kwargs(spec: JobSpec, labels: list[str] | None) -> dict:
    if labels is None or not TASKS[spec.task].label_head:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


def load_model(spec: JobSpec, path: str, labels: list[str] | None, pad_token_id: int | None) -> nn.Module:
    """The base with the task head: BERT-style heads are freshly initialised, as HF does."""
    auto = model_class(spec.task)
    if spec.model.init == "pretrained":
        model = auto.from_pretrained(path, revision=spec.model.revision, dtype=torch.float32,
                                     **head_kwargs(spec, labels))
    else:
        config = model_config(spec, path, labels)
        torch.manual_seed(spec.train.seed)
        model = auto.from_config(config, dtype=torch.float32)
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id  # decoder seq-cls heads find the last token by it
    return model


def base_fingerprint(model: nn.Module, skip: tuple[str, ...] = ()) -> str:
    """sha256 of the backbone's weights (fp32), excluding task heads, which each tune brings itself.

    Serving compares this to the served base before it accepts an adapter. `skip`: name prefixes
    left out (serving also accepts the backbone without BERT's pooler, which token-classification
    and QA models do not build).
    """
    backbone = getattr(model, "base_model", model)
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        if name.startswith(skip):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules beside the backbone: the task head (classifier, score, qa_outputs, ...)."""
    backbone = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children()
            if name != backbone and name not in TIED_HEADS and any(True for _ in child.parameters())]


def is_decoder_only(model_config) -> bool:
    """A causal-LM architecture without a masked-LM form (Llama, GPT-2, ...), from its HF config."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(model_config, "model_type", "")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
