"""Spec pieces for instruction tuning on a mixture of tasks, and for held-out-task evaluation.

    data:
      source: mixture                       # the rows come from data.mixture
      mixture:
        - {source: bundled:chat-pairs, weight: 2, max_samples: 400}
        - {source: "bundled:arithmetic?n=400", instruction: ["Solve:", "Answer with a number."], weight: 1}
    evaluation:
      held_out:
        - {name: sentiment, data: {source: bundled:tweet-sentiment}, labels: {negative: [negative], ...}}

The models here need nothing from the rest of the job spec; schema.py puts the held-out task's
`data:` (the job spec's own data block) on top of HeldOutFields. Loading lives in data/mixture.py,
held-out scoring in train/heldout.py.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from onebase.spec.base import Strict

MIXTURE_SOURCE = "mixture"  # data.source when the rows come from data.mixture
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_name(source: str) -> str:
    """'bundled:last-letter?n=200&words=3' -> 'last-letter'; 'data/qa.jsonl' -> 'qa'."""
    if source.startswith("bundled:"):
        return source.removeprefix("bundled:").partition("?")[0]
    return Path(source).stem


def check_name(name: str | None) -> str | None:
    if name is not None and not _NAME.match(name):
        raise ValueError("use letters, digits, '.', '_' or '-' (at most 64; it names metrics)")
    return name


def check_template(template: str | None, slots: set[str]) -> str | None:
    """chat, alpaca, or a format string using only `slots` (and at least one of them)."""
    if template is None or template in ("chat", "alpaca"):
        return template
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"not a valid format string: {err}") from None
    unknown = sorted(used - slots)
    if unknown:
        raise ValueError(f"unknown slot {{{unknown[0]}}} (slots: {', '.join('{' + s + '}' for s in sorted(slots))})")
    if not used:
        raise ValueError(f"a custom template needs a slot ({', '.join('{' + s + '}' for s in sorted(slots))})")
    return template


class MixtureSource(Strict):
    """One task of an instruction-tuning mixture: its rows, how they are phrased, how much of it."""

    name: str | None = Field(None, description="names the source's metrics (default: from the source)")
    source: str = Field(description="bundled:chat-pairs, bundled:last-letter|arithmetic|coin-flip?..., or a file")
    columns: dict[str, str] = Field(default_factory=dict, description="role -> column (causal-lm roles)")
    instruction: str | list[str] | None = Field(
        None, description="for rows without an instruction column; a list: one phrasing drawn per row (seeded)")
    template: str | None = Field(None, description="chat | alpaca | custom; default: the job's prompt.template")
    max_samples: int | None = Field(None, gt=0, description="the cap: at most this many distinct training rows")
    weight: float = Field(1.0, gt=0, description="share of the mixture's training rows, relative to the others")

    _name_ok = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @field_validator("instruction")
    @classmethod
    def _phrasings(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (not value or not all(p.strip() for p in value)):
            raise ValueError("a list of phrasings needs at least one, none of them empty")
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        return check_template(template, {"instruction", "input"})

    @property
    def label(self) -> str:
        return self.name or default_name(self.source)

    @property
    def phrasings(self) -> list[str]:
        if self.instruction is None:
            return []
        return [self.instruction] if isinstance(self.instruction, str) else list(self.instruction)


def check_mixture(source: str, mixture: list[MixtureSource] | None) -> None:
    """data.source is `mixture` exactly when data.mixture lists the sources; names are unique."""
    if mixture is None:
        if source == MIXTURE_SOURCE:
            raise ValueError("data.source: mixture needs data.mixture (a list of sources)")
        return
    if source != MIXTURE_SOURCE:
        raise ValueError(f"data.mixture: set data.source: {MIXTURE_SOURCE} to train on the mixture "
                         f"(got source {source!r})")
    check_unique([m.label for m in mixture], "data.mixture", "sources")


class HeldOutFields(Strict):
    """A held-out task as a zero-shot prompt program (the prompt program spec's own fields)."""

    name: str | None = Field(None, description="names the metrics heldout/<name>/... (default: from the source)")
    labels: dict[str, list[str]] | None = Field(
        None, description="classification: label -> verbalizer strings (scored by loglik or generate)")
    extractor: dict | None = Field(
        None, description="generation: the program spec's extractor {kind: first-line|last-number|regex|label}")
    instruction: str = ""
    system: str | None = None
    template: str = Field("chat", description="chat, or a string with the query slot {input}")
    scoring: Literal["loglik", "generate"] = "loglik"
    max_new_tokens: int = Field(16, ge=1, le=2048)

    _name_ok = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @model_validator(mode="after")
    def _labels_or_extractor(self) -> HeldOutFields:
        if not self.labels and not self.extractor:
            raise ValueError("a held-out task needs labels (with their verbalizers) or an extractor")
        return self

    @property
    def task(self) -> str:
        return "classification" if self.labels else "generation"


class EvaluationFields(Strict):
    workers: int = Field(1, gt=0, description="Ray actors scoring held-out tasks (one model load each)")
    cpus_per_worker: float = Field(1, gt=0)
    batch_size: int = Field(8, gt=0)


def check_held_out_names(names: list[str]) -> None:
    check_unique(names, "evaluation.held_out", "tasks")


def check_unique(names: list[str], field: str, what: str) -> None:
    """Names key metrics (mixture/<source>/..., heldout/<task>/...): two alike would mix their figures."""
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ValueError(f"{field}: two {what} are named {duplicate!r}; give them distinct names")
