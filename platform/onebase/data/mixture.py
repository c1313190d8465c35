"""Instruction-tuning mixtures (FLAN/T0 style): several causal-LM sources mixed into one training set.

Each source is read with the job's own loader (bundled corpora, generated reasoning tasks, CSV/JSONL
with its own column mapping), so every check a single-source job gets applies per source, its errors
prefixed `data.mixture[i]`. Then:

- phrasing: rows without an instruction column get one of the source's instruction phrasings, drawn
  per row with a generator seeded by the job's seed and the source's name (reproducible, and the
  same row keeps its phrasing across runs);
- split: each source is split into training and validation rows on its own (data.validation's
  fraction and seed; max_samples caps each source's validation rows), so evaluation can report
  every source separately: validation rows carry their source's name;
- cap and weight: a source contributes at most `max_samples` distinct training rows; the mixture
  has `data.max_samples` training rows (default: the sum of the capped sources), shared out in
  proportion to the weights. A source whose share exceeds its rows is repeated (each pass in a new
  order), as examples-proportional mixing with a cap does;
- template: a source's own `template` travels on its rows and overrides prompt.template for them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from onebase.errors import DataError
from onebase.spec.mixture import MixtureSource
from onebase.spec.schema import JobSpec

SOURCE_KEY = "source"  # row key: the mixture source a row came from
TEMPLATE_KEY = "template"  # row key: the source's own prompt template


@dataclass
class Part:
    name: str
    weight: float
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]


def load_mixture(spec: JobSpec):
    """The Dataset of a `data.source: mixture` job (causal-lm; no label set: held-out tasks score)."""
    from onebase.data.sources import Dataset

    if spec.data.validation.path:
        raise DataError("data.validation.path: a mixture splits each source itself (use fraction and seed)")
    parts = [load_part(spec, i, source) for i, source in enumerate(spec.data.mixture or [])]
    total = spec.data.max_samples or sum(len(p.train) for p in parts)
    rng = random.Random(spec.train.seed)
    train = [row for part, n in zip(parts, shares(total, [p.weight for p in parts]))
             for row in draw(part.train, n, rng)]
    rng.shuffle(train)
    return Dataset(train=train, validation=[row for p in parts for row in p.validation], labels=None)


def load_part(spec: JobSpec, index: int, source: MixtureSource) -> Part:
    """One source's rows, phrased, tagged and split; its errors name data.mixture[index]."""
    from onebase.data.sources import check_not_all_empty, read_source, split

    view = source_view(spec, source)
    try:
        rows = read_source(view, source.source)
        phrasing_rng = random.Random(f"{spec.train.seed}:{source.label}")
        rows = [tag(row, source, phrasing_rng) for row in rows]
        train, validation = split(rows, spec.data.validation.fraction, spec.data.validation.seed)
        train = train[: source.max_samples] if source.max_samples else train
        validation = validation[: spec.data.validation.max_samples] if spec.data.validation.max_samples else validation
        if not train or not validation:
            raise DataError(f"data: {source.source} gives {len(train)} training and {len(validation)} validation "
                            "rows; both must be non-empty")
        check_not_all_empty(view, train)
    except DataError as err:
        raise DataError(located(str(err), index, source)) from None
    return Part(source.label, source.weight, train, validation)


def source_view(spec: JobSpec, source: MixtureSource) -> JobSpec:
    """The job as if `source` were its only data (no re-validation: the mixture spec was validated)."""
    data = spec.data.model_copy(update={"source": source.source, "columns": source.columns, "mixture": None})
    phrasing = source.phrasings[0] if source.phrasings else None
    prompt = spec.prompt.model_copy(update={"instruction": phrasing or spec.prompt.instruction})
    return spec.model_copy(update={"data": data, "prompt": prompt})


def tag(row: dict[str, Any], source: MixtureSource, rng: random.Random) -> dict[str, Any]:
    phrasings = source.phrasings
    # Drawn for every row, used or not, so a row's phrasing does not depend on its neighbours' columns.
    phrasing = rng.choice(phrasings) if phrasings else None
    out = {**row, SOURCE_KEY: source.label}
    if phrasing and not row.get("instruction"):
        out["instruction"] = phrasing
    if source.template:
        out[TEMPLATE_KEY] = source.template
    return out


def shares(total: int, weights: list[float]) -> list[int]:
    """`total` rows split in proportion to `weights` (largest remainders; every source gets at least one)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [max(1, int(x)) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: int(exact[i]) - exact[i])
    for i in by_remainder[: max(0, total - sum(counts))]:
        counts[i] += 1
    return counts


def draw(rows: list[dict[str, Any]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """n rows: whole shuffled passes over `rows`, then a shuffled part of one more."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        order = list(rows)
        rng.shuffle(order)
        out += order[: n - len(out)]
    return out


def located(message: str, index: int, source: MixtureSource) -> str:
    """'data.columns.response: ...' -> 'data.mixture[0].columns.response: ...' (the source's own field)."""
    where = f"data.mixture[{index}]"
    if message.startswith("data."):
        return f"{where}.{message.removeprefix('data.')}"
    if message.startswith("data:"):
        return f"{where} ({source.label}):{message.removeprefix('data:')}"
    return f"{where} ({source.label}): {message}"


def source_names(rows: list[dict[str, Any]]) -> list[str] | None:
    """The mixture source of each validation row (per-source evaluation), or None for a one-source job."""
    names = [row.get(SOURCE_KEY) for row in rows]
    return names if names and all(isinstance(n, str) for n in names) else None
