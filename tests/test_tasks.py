"""Every task head trains through the same loop: token classification, extractive QA, causal-LM prompts."""

from __future__ import annotations

import json
import random

from conftest import TINY_LLAMA, tiny_spec
from onebase.data.prepare import IGNORE, tokenize
from onebase.model.assets import resolve_model
from onebase.model.build import load_tokenizer
from onebase.spec import parse_spec
from onebase.train.launch import run_job

WORDS = ["alice", "bob", "paris", "berlin", "went", "to", "met", "in", "monday", "the", "city", "carol"]
TAGS = {"alice": "PER", "bob": "PER", "carol": "PER", "paris": "LOC", "berlin": "LOC"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_token_classification_with_a_user_jsonl(ray_cluster, workspace):
    rng = random.Random(0)
    rows = []
    for _ in range(160):
        tokens = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        rows.append({"words": tokens, "ner": [TAGS.get(t, "O") for t in tokens]})
    source = write_jsonl(workspace / "ner.jsonl", rows)
    spec = tiny_spec("tiny-ner", task="token-classification",
                     data={"source": source, "columns": {"tokens": "words", "tags": "ner"},
                           "validation": {"fraction": 0.2}},
                     train={"epochs": 3, "learning_rate": 5e-3}, scaling={"num_workers": 1})
    result = run_job(parse_spec(spec), "")
    assert result.info["labels"] == ["LOC", "O", "PER"]
    assert result.metrics["accuracy"] > 0.6  # three tags, one per word: the head learned the mapping


def test_extractive_qa_with_a_user_csv(ray_cluster, workspace):
    rng = random.Random(1)
    lines, starts = ["question,context,answer,answer_start"], []
    for _ in range(160):
        person, city = rng.choice(["alice", "bob", "carol"]), rng.choice(["paris", "berlin", "rome"])
        # A varying number of filler words first: the answer is not always at the same position.
        filler = " ".join(rng.choice(["then", "later", "so", "and"]) for _ in range(rng.randint(0, 4)))
        context = f"{filler} on monday {person} went to {city} and met friends".strip()
        lines.append(f"where did {person} go?,{context},{city},{context.index(city)}")
        starts.append(context.index(city))
    (workspace / "qa.csv").write_text("\n".join(lines) + "\n")
    spec = tiny_spec("tiny-qa", task="extractive-qa", data={"source": str(workspace / "qa.csv")},
                     method={"name": "lora", "r": 4, "target_modules": ["query", "value"]},
                     train={"epochs": 4, "learning_rate": 1e-2}, scaling={"num_workers": 1},
                     deepspeed={"stage": 2})
    result = run_job(parse_spec(spec), "")
    assert {"exact_match", "eval_loss"} <= set(result.metrics)
    assert (result.export_dir / "adapter_model.safetensors").is_file()
    # The quality bar: well above always answering at the most common position (what a model that
    # learned positions only, not the city words, would score).
    by_position = max(starts.count(start) for start in set(starts)) / len(starts)
    assert by_position < 0.4
    assert result.metrics["exact_match"] >= max(0.75, by_position + 0.2), result.metrics


def test_causal_prompt_masks_everything_but_the_response():
    spec = parse_spec(tiny_spec("mask", task="causal-lm", model=TINY_LLAMA,
                                prompt={"template": "alpaca", "instruction": "Classify."}))
    tokenizer = load_tokenizer(resolve_model(spec.model.name))
    [feature] = tokenize(spec, tokenizer, [{"input": "great day", "response": "positive"}], None)
    response = tokenizer("positive", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    trained = [label for label in feature["labels"] if label != IGNORE]
    assert trained == response
    assert feature["input_ids"][-len(response):] == response
    prompt = tokenizer.decode(feature["input_ids"][: -len(response)])
    assert "### Instruction:\nClassify." in prompt and "great day" in prompt


def test_evaluation_reports_the_metrics_the_task_table_names():
    from onebase.tasks import TASKS
    from onebase.train.evaluate import summarise

    samples = {
        "sequence-classification": [{"pred": [1], "gold": [1], "loss": 0.1, "n": 1}],
        "token-classification": [{"pred": [0, 2], "gold": [0, 1], "loss": 0.4, "n": 2}],
        "extractive-qa": [{"span": (3, 4), "gold_span": [3, 4], "loss": 0.2, "n": 1}],
        "causal-lm": [{"pred": [5, 2], "gold": [5, 2], "loss": 0.6, "n": 2}],
    }
    assert set(samples) == set(TASKS)
    for task, rows in samples.items():
        metrics = summarise(task, rows, num_labels=3)
        assert set(metrics) == {"eval_loss", "eval_samples", *TASKS[task].metrics}, task
