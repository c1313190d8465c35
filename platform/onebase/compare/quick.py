"""`--quick`: the same contenders on tiny random models and a few rows, so CI exercises every
contender kind in minutes. Every base becomes a 2-layer, 64-wide random model of its own
architecture (tokenizer kept); ICL keeps two k and two seeds; searches draw 2 learning rates."""

from __future__ import annotations

import copy
from typing import Any

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
TINY_DECODER = {**TINY, "num_key_value_heads": 1}
QUICK_JOB = {"train": {"epochs": 1, "max_steps": 3, "eval_every_steps": 3, "batch_size": 8, "eval_batch_size": 16,
                       "log_every_steps": 1},
             "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}}, "deepspeed": {"stage": 2}}
QUICK_PROGRAM = {"workers": 1, "batch_size": 8}


def tiny(model: dict[str, Any]) -> dict[str, Any]:
    import transformers

    from onebase.model.assets import check_model_available

    config = transformers.AutoConfig.from_pretrained(check_model_available(model["name"]))
    decoder = bool(getattr(config, "is_decoder", False)) or config.model_type in ("llama", "mistral", "qwen2", "gpt2")
    return {"name": model["name"], "init": "random", "config_overrides": TINY_DECODER if decoder else TINY}


def cut_down(raw: dict[str, Any]) -> dict[str, Any]:
    from onebase.compare.plan import merge

    raw = copy.deepcopy(raw)
    if isinstance(raw.get("bases"), dict):
        raw["bases"] = {k: tiny(v) if isinstance(v, dict) and "name" in v else v for k, v in raw["bases"].items()}
    data = raw.setdefault("data", {}) if isinstance(raw.get("data", {}), dict) else {}
    data["max_samples"] = min(int(data.get("max_samples") or 96), 96)
    data["max_length"] = min(int(data.get("max_length") or 48), 48)
    validation = data.setdefault("validation", {})
    validation["max_samples"] = min(int(validation.get("max_samples") or 24), 24)
    raw["job"] = merge(raw.get("job") or {}, QUICK_JOB)
    raw["program"] = merge(raw.get("program") or {}, QUICK_PROGRAM)
    program = raw["program"]
    program["max_new_tokens"] = min(int(program.get("max_new_tokens", 4)), 4)
    for c in raw.get("contenders") or []:
        if not isinstance(c, dict):
            continue
        cut_contender(c, raw["bases"])
    return raw


def cut_contender(c: dict[str, Any], bases: dict[str, Any]) -> None:
    kind = c.get("kind")
    if kind in ("icl", "program"):
        c["seeds"] = (c.get("seeds") or [0, 1])[:2]
    if kind == "icl":
        c["k"] = sorted(c.get("k") or [1])[:2]
        c["k"] = [min(k, 4) for k in c["k"]]
    if kind == "train":
        c["draws"] = min(int(c.get("draws", 4)), 2)
    program = c.setdefault("program", {})
    if isinstance(program.get("reasoning"), dict):
        program["reasoning"]["max_reasoning_tokens"] = 8
        program["reasoning"]["max_subquestions"] = 2
    if isinstance(program.get("self_consistency"), dict):
        program["self_consistency"]["samples"] = min(int(program["self_consistency"].get("samples", 1)), 2)
    if kind == "ape":
        program["search"] = {"candidates": 2, "dev_rows": 8, "top": 1, "variations": 0, "report_top": 1,
                             "max_new_tokens": 8}
    if kind == "generalist" and c.get("export") is None:  # an export is already trained: nothing to cut
        base = bases.get(c.get("base"), {})
        job = c.setdefault("job", {})
        job.update({"model.name": base.get("name"), "model.init": "random",
                    "model.config_overrides": base.get("config_overrides"), "data.max_samples": 48,
                    "data.max_length": 48, "data.validation.max_samples": 4, "train.max_steps": 2,
                    "train.eval_every_steps": 2, "train.batch_size": 8, "scaling.num_workers": 1,
                    "scaling.resources_per_worker": {"CPU": 1}, "evaluation": None})
