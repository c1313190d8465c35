"""Prompt programs on a tiny random Llama (SmolLM2's tokenizer and chat template): demos from the
training split only, contextual calibration by hand, the self-consistency vote, the demo-prefix
cache against the uncached computation, the artifact, the generated reasoning datasets, bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections import Counter

import pytest
import torch

from conftest import REPO, TINY_LLAMA
from onebase.data.sources import load_dataset
from onebase.model.build import base_fingerprint
from onebase.prompt import Demo, Program, ProgramRunner, is_program_dir, load_program, read_manifest, save_program
from onebase.prompt.answers import extract, normalise, vote
from onebase.prompt.demos import build_program
from onebase.prompt.spec import ExtractorSpec, parse_program_spec
from onebase.prompt.worker import load_base

LABELS = {"negative": ["negative", "bad"], "neutral": ["neutral"], "positive": ["positive", "good"]}


def program_spec(data: dict, **fields) -> dict:
    return {"kind": "prompt-program", "name": "tiny-prog", "base": TINY_LLAMA["name"], "base_init": "random",
            "base_config_overrides": TINY_LLAMA["config_overrides"], "task": "classification", "labels": LABELS,
            "data": data, "instruction": "Classify the sentiment.", **fields}


@pytest.fixture(scope="module")
def tagged_csv(tmp_path_factory):
    """60 rows whose texts name their row, so a demo's origin is unambiguous."""
    path = tmp_path_factory.mktemp("prompt") / "rows.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(60):
            writer.writerow([f"row {i}: this is {['awful', 'fine', 'great'][i % 3]}", list(LABELS)[i % 3]])
    return path


@pytest.fixture(scope="module")
def base():
    spec = parse_program_spec(program_spec({"source": "bundled:tweet-sentiment"}))
    from onebase.model.assets import resolve_model

    model, tokenizer = load_base(spec, resolve_model(spec.base))
    # One thread: on a shared 2-core machine, intra-op threads made these small forwards 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, tokenizer
    torch.set_num_threads(threads)


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("selection", ["random", "balanced", "similar"])
def test_icl_demos_come_from_the_training_split_only(tagged_csv, base, selection):
    spec = parse_program_spec(program_spec({"source": str(tagged_csv), "validation": {"fraction": 0.25, "seed": 3}},
                                           demos={"k": 6, "selection": selection, "seed": 5}))
    dataset = load_dataset(spec.job_spec())
    train_texts = {r["text"] for r in dataset.train}
    eval_texts = {r["text"] for r in dataset.validation}
    program = build_program(spec, dataset.train, dataset.labels, "sha")
    if selection == "similar":
        assert program.demos == [] and {d.input for d in program.demo_pool} <= train_texts
        runner = ProgramRunner(*base, program)
        for text in sorted(eval_texts)[:3]:  # each query's neighbours, picked at run time
            chosen = runner.neighbours(text)
            assert len(chosen) == 6 and {d.input for d in chosen} <= train_texts
    else:
        assert len(program.demos) == 6
        assert {d.input for d in program.demos} <= train_texts
        assert not {d.input for d in program.demos} & eval_texts
        assert all(d.answer == next(r["label"] for r in dataset.train if r["text"] == d.input) for d in program.demos)
    if selection == "balanced":
        assert Counter(d.answer for d in program.demos) == {"negative": 2, "neutral": 2, "positive": 2}


def test_random_label_ablation_keeps_inputs_and_draws_labels(tagged_csv):
    gold = parse_program_spec(program_spec({"source": str(tagged_csv)}, demos={"k": 12, "seed": 1}))
    shuffled = parse_program_spec(program_spec({"source": str(tagged_csv)},
                                               demos={"k": 12, "seed": 1, "labels": "random"}))
    dataset = load_dataset(gold.job_spec())
    a = build_program(gold, dataset.train, dataset.labels, "sha").demos
    b = build_program(shuffled, dataset.train, dataset.labels, "sha").demos
    assert [d.input for d in a] == [d.input for d in b]
    assert [d.answer for d in a] != [d.answer for d in b] and {d.answer for d in b} <= set(LABELS)


def label_logprob_by_hand(model, tokenizer, messages, verbalizer: str) -> float:
    """log p(verbalizer | chat prompt), from one plain forward over the whole tokenised text."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt + verbalizer, add_special_tokens=False)["input_ids"]
    n = len(tokenizer(verbalizer, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logprobs[len(ids) - n - 1 + j, ids[len(ids) - n + j]] for j in range(n)))


def probs_by_hand(model, tokenizer, program: Program, text: str) -> list[float]:
    messages = [{"role": "user", "content": f"{program.instruction}\n\n{program.demos[0].input}"},
                {"role": "assistant", "content": program.labels[program.demos[0].answer][0]},
                {"role": "user", "content": text}]
    scores = [torch.logsumexp(torch.tensor([label_logprob_by_hand(model, tokenizer, messages, w) for w in words]), 0)
              for words in program.labels.values()]
    return torch.softmax(torch.stack(scores), 0).tolist()


def test_contextual_calibration_matches_a_hand_computation(base):
    model, tokenizer = base
    program = Program(name="cal", base="tiny", base_sha256="x", task="classification", labels=LABELS,
                      instruction="Classify the sentiment.", k=1, demos=[Demo(input="so good", answer="positive")],
                      calibration={"mode": "contextual"})
    runner = ProgramRunner(model, tokenizer, program)
    queries = ["I love it", "worst day ever"]
    got = runner.classify(queries)

    content_free = [probs_by_hand(model, tokenizer, program, t) for t in ("N/A", "", "[MASK]")]
    p_cf = torch.tensor(content_free, dtype=torch.float64).mean(0)
    p_cf = p_cf / p_cf.sum()
    assert program.calibration.p_cf == pytest.approx(p_cf.tolist(), abs=1e-5)
    for query, probs in zip(queries, got):
        raw = torch.tensor(probs_by_hand(model, tokenizer, program, query), dtype=torch.float64)
        calibrated = raw / p_cf
        calibrated = calibrated / calibrated.sum()  # argmax(diag(p_cf)^-1 p), as probabilities
        assert list(probs.values()) == pytest.approx(calibrated.tolist(), abs=1e-5)
        assert max(probs, key=probs.get) == list(LABELS)[int(calibrated.argmax())]
    uncalibrated = ProgramRunner(model, tokenizer, program.model_copy(update={"calibration": type(
        program.calibration)()})).classify(queries)
    assert uncalibrated != got


def test_self_consistency_vote_is_a_true_majority(base):
    assert vote(["3", "4", "3", None, "4", "3"]) == "3"
    assert vote(["4", "3", "3.0", "4", "03"]) == "3"  # compared as numbers
    assert vote(["b", "a", "a", "b"]) == "b"  # a tie goes to the answer reached first
    assert vote([None, None]) is None
    program = Program(name="sc", base="tiny", base_sha256="x", task="generation", instruction="Answer.",
                      extractor={"kind": "regex", "pattern": r"(\w)"}, max_new_tokens=3,
                      self_consistency={"samples": 9, "temperature": 1.5, "top_p": 1.0, "seed": 4})
    predictions = ProgramRunner(*base, program).predict(["What is two plus two?", "Name a colour."])
    for prediction in predictions:
        assert len(prediction.samples) == 9
        counts = Counter(normalise(a) for a in prediction.samples if a is not None)
        assert normalise(prediction.answer) in counts
        assert counts[normalise(prediction.answer)] == max(counts.values())
        assert len(counts) > 1, "sampling should give more than one answer on a random model"


def test_cached_prefix_outputs_equal_the_uncached_computation(base):
    model, tokenizer = base
    before = weights_digest(model)
    demos = [Demo(input=f"example tweet number {i}", answer=list(LABELS)[i % 3]) for i in range(8)]
    program = Program(name="c", base="tiny", base_sha256="x", task="classification", labels=LABELS,
                      instruction="Classify.", demos=demos, k=8, calibration={"mode": "contextual"})
    queries = ["I love it", "worst day ever", "meh", "a much longer tweet about the weather today and tomorrow"]
    cached = ProgramRunner(model, tokenizer, program.model_copy(deep=True), batch_size=3)
    plain = ProgramRunner(model, tokenizer, program.model_copy(deep=True), batch_size=3, cache_prefix=False)
    assert cached.lm.cached and not plain.lm.cached and cached.lm.prefix_len > 100
    for a, b in zip(cached.classify(queries), plain.classify(queries)):
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-6)
    # Greedy and sampled generation (CoT + self-consistency) give the very same tokens.
    gen = Program.model_validate({**program.model_dump(), "task": "generation", "labels": None,
                                  "calibration": {"mode": "none"}, "max_new_tokens": 5,
                                  "reasoning": {"mode": "cot", "max_reasoning_tokens": 6},
                                  "self_consistency": {"samples": 3, "temperature": 1.0}})
    runs = [ProgramRunner(model, tokenizer, gen, cache_prefix=c).predict(queries) for c in (True, False)]
    assert [(p.text, p.samples) for p in runs[0]] == [(p.text, p.samples) for p in runs[1]]
    assert runs[0][0].prompt_tokens == runs[1][0].prompt_tokens == cached.prompt_tokens(queries[0])
    assert weights_digest(model) == before, "running a program must not write the base"


def test_program_artifact_round_trip(tmp_path, base):
    model, _ = base
    program = Program(name="art", base="smollm2-135m-instruct", base_sha256=base_fingerprint(model),
                      task="classification", labels=LABELS, demos=[Demo(input="x", answer="neutral")], k=1,
                      calibration={"mode": "contextual", "p_cf": [0.5, 0.25, 0.25]})
    save_program(program, tmp_path / "p", metrics={"macro_f1": 0.5})
    assert load_program(tmp_path / "p") == program
    assert is_program_dir(tmp_path) and is_program_dir(tmp_path / "p")  # MLflow downloads add a folder level
    manifest = read_manifest(tmp_path / "p")
    assert manifest["method"] == "prompt-program" and manifest["task"] == "classification"
    assert manifest["base_sha256"] == manifest["base_fingerprint"] == base_fingerprint(model)
    assert manifest["labels"] == list(LABELS) and manifest["metrics"] == {"macro_f1": 0.5}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "p").iterdir())


def test_answer_extractors():
    assert extract(ExtractorSpec(kind="last-number"), "3 + 4 = 7, then 7 * 2 = 1,400.") == "1400"
    assert extract(ExtractorSpec(kind="first-line"), "  yes\nbecause") == "yes"
    assert extract(ExtractorSpec(kind="regex", pattern=r"answer is (\w+)"), "so the answer is ab.") == "ab"
    assert extract(ExtractorSpec(kind="label"), "Positive, clearly", LABELS) == "positive"
    assert extract(ExtractorSpec(kind="last-number"), "no digits") is None


@pytest.mark.parametrize("source, task", [("bundled:last-letter?n=40&seed=1&words=3", "causal-lm"),
                                          ("bundled:arithmetic?n=40&seed=1&steps=3", "causal-lm"),
                                          ("bundled:coin-flip?n=40&seed=1", "sequence-classification")])
def test_generated_reasoning_datasets_are_deterministic_and_correct(source, task):
    from onebase.spec import parse_spec

    def rows(src):
        spec = parse_spec({"name": "gen", "task": task, "model": {"name": "smollm2-135m-instruct"},
                           "data": {"source": src, "validation": {"fraction": 0.25}}})
        data = load_dataset(spec)  # a fine-tune job spec reads them like any bundled corpus
        return data.train + data.validation

    first, again = rows(source), rows(source)
    assert first == again and rows(source.replace("seed=1", "seed=2")) != first
    for row in first:
        question, answer = row.get("input", row.get("text")), row.get("response", row.get("label"))
        if "last-letter" in source:
            words = question.split('"')[1].split()
            assert len(words) == 3 and answer == "".join(w[-1] for w in words)
        elif "arithmetic" in source:
            assert row["rationale"].rstrip(".").split("= ")[-1] == answer
        else:
            assert answer == ("yes" if question.count(" flips ") % 2 == 0 else "no")


def run_bad_cases(workspace, cases: dict[str, dict]) -> dict[str, tuple[int, list[str]]]:
    """Every case through `onebase prompt eval` in one fresh interpreter; Ray must never start."""
    import subprocess
    import tempfile

    import yaml

    paths = {}
    for name, spec in cases.items():
        paths[name] = workspace / f"bad-{name}.yaml"
        paths[name].write_text(yaml.safe_dump(spec, sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="obprompt-", dir="/tmp")
    script = (
        "import contextlib, io, json, sys\nfrom onebase.cli import main\nout = {}\n"
        f"for name, path in {json.dumps({k: str(v) for k, v in paths.items()})}.items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = main(['prompt', 'eval', path])\n"
        "    out[name] = [rc, err.getvalue().splitlines()]\n"
        "import ray\nout['ray'] = ray.is_initialized()\nprint(json.dumps(out))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=workspace, capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "RAY_TMPDIR": ray_tmp})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out.pop("ray") is False and not list(__import__("pathlib").Path(ray_tmp).rglob("session_*"))
    return out


def test_bad_program_specs_fail_in_one_line_before_anything_runs(workspace, tagged_csv):
    data = {"source": str(tagged_csv)}
    cases = {
        "unknown-field": (program_spec(data, demoz={"k": 1}), "demoz: unknown field"),
        "no-verbalizer": (program_spec(data, labels={**LABELS, "neutral": []}),
                          "labels: label 'neutral' has no verbalizer"),
        "missing-label": (program_spec(data, labels={"negative": ["bad"], "positive": ["good"]}),
                          "label 'neutral' without a verbalizer"),
        "k-too-large": (program_spec(data, demos={"k": 60}), "demos.k: 60 demonstrations asked, the training split "
                                                             "has only 54 rows"),
        "no-query-slot": (program_spec(data, template="Tweet: {text}\nSentiment:"), "template: "),
        "not-causal": (program_spec(data, base="minilm", base_config_overrides={}, base_init="pretrained"),
                       "base: minilm is not a causal LM"),
        "bad-regex": (program_spec(data, task="generation", labels=None, extractor={"kind": "regex", "pattern": "(a"}),
                      "extractor: Value error, pattern '(a' does not compile"),
        "wrong-kind": ({**program_spec(data), "kind": "job"}, "kind: must be prompt-program"),
    }
    results = run_bad_cases(workspace, {name: spec for name, (spec, _) in cases.items()})
    for name, (_, expected) in cases.items():
        rc, lines = results[name]
        assert rc == 2, (name, lines)
        assert len(lines) == 1 and lines[0].startswith("onebase: error: "), (name, lines)
        assert expected.replace("Value error, ", "") in lines[0], (name, lines[0])


def test_shipped_program_specs_validate():
    from onebase.prompt.spec import load_program_spec

    shipped = sorted((REPO / "jobs").glob("prompt-*.yaml"))
    assert len(shipped) >= 10
    for path in shipped:
        load_program_spec(path)
