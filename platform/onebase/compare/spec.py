"""The compare spec: one task (a job spec's `data:` block, so every row is scored on the same
evaluation rows), the bases, and the contenders. Every model forbids unknown fields.

```yaml
kind: compare
name: compare-tweet-sentiment
task: classification                 # | generation
data: {source: bundled:tweet-sentiment, max_samples: 4000, validation: {max_samples: 600}}
labels: {negative: [negative], neutral: [neutral], positive: [positive]}   # verbalizers (prompt rows)
instruction: "Classify the sentiment ..."
bases: {decoder: {name: smollm2-135m-instruct}, encoder: {name: minilm}}
program: {template: chat, workers: 2}            # fields every prompt row's program gets
job: {train: {epochs: 1}, scaling: {...}}        # fields every training row's job gets
contenders:
  - {kind: majority, name: majority}
  - {kind: program, name: zero-shot, base: decoder}
  - {kind: icl, name: icl, base: decoder, k: [1, 4, 8], seeds: [0, 1, 2],
     labels: [gold, random], calibration: [none, contextual]}
  - {kind: ape, name: ape, base: decoder, program: {search: {candidates: 8}}}
  - {kind: train, name: lora-smollm2, base: decoder, method: {name: lora, r: 8},
     learning_rate: [1.0e-4, 3.0e-3], draws: 4}
  - {kind: generalist, name: flan-generalist, base: decoder, job_file: flan-mixture-smollm2.yaml}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from onebase.spec.base import Strict
from onebase.spec.load import parse_kind, read_spec_mapping
from onebase.spec.schema import DataSpec, ModelSpec, OutputSpec, TrackingSpec

KIND = "compare"
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,60}$"


class Contender(Strict):
    name: str = Field(pattern=NAME)
    base: str | None = Field(None, description="a key of `bases:` (majority needs none)")
    program: dict[str, Any] = Field(default_factory=dict, description="program fields for this row")


class Majority(Contender):
    kind: Literal["majority"]


class ProgramRow(Contender):
    """One prompt program, evaluated once per demo seed (the spread is over `seeds`)."""

    kind: Literal["program"]
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)


class ICL(Contender):
    """The k-shot grid: one row per (k, demo labels, calibration), each over `seeds`."""

    kind: Literal["icl"]
    k: list[int] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    labels: list[Literal["gold", "random"]] = Field(default_factory=lambda: ["gold"], min_length=1)
    calibration: list[Literal["none", "contextual"]] = Field(default_factory=lambda: ["none"], min_length=1)

    @field_validator("k")
    @classmethod
    def _k_positive(cls, k: list[int]) -> list[int]:
        if any(v < 1 or v > 64 for v in k):
            raise ValueError("every k is 1..64 (k=0 is a `program` row)")
        return k


class APE(Contender):
    kind: Literal["ape"]


class Train(Contender):
    """A tuning method on one base: a Ray Tune search over the learning rate (log-uniform)."""

    kind: Literal["train"]
    method: dict[str, Any] = Field(description="the job's method block, e.g. {name: lora, r: 8}")
    learning_rate: list[float] = Field(min_length=2, max_length=2, description="[low, high], log-uniform")
    draws: int = Field(4, ge=1, le=64, description="learning rates drawn (the issue asks for at least 4)")
    seed: int = 0
    job: dict[str, Any] = Field(default_factory=dict, description="dotted job fields for this row only")

    @field_validator("learning_rate")
    @classmethod
    def _range(cls, bounds: list[float]) -> list[float]:
        if not 0 < bounds[0] <= bounds[1]:
            raise ValueError(f"empty log-uniform range {bounds}")
        return bounds


class Generalist(Contender):
    """An instruction-tuned generalist, scored zero-shot by a program that runs on the base + its export
    (`adapter:`): either trained here (`job_file`) or trained once elsewhere and reused (`export`), as a
    FLAN-style generalist is meant to be, across every task compared."""

    kind: Literal["generalist"]
    job_file: str | None = Field(None, description="a causal-lm job spec (relative to the compare spec)")
    job: dict[str, Any] = Field(default_factory=dict, description="dotted fields set on that job")
    export: str | None = Field(None, description="a trained causal-lm export (relative to the compare spec)")

    @model_validator(mode="after")
    def _one_source(self) -> Generalist:
        if (self.job_file is None) == (self.export is None):
            raise ValueError(f"contender {self.name}: give exactly one of job_file (train it here) or export "
                             "(a trained export)")
        if self.export is not None and self.job:
            raise ValueError(f"contender {self.name}: job: sets fields of job_file; an export is already trained")
        return self


AnyContender = Annotated[Majority | ProgramRow | ICL | APE | Train | Generalist, Field(discriminator="kind")]


class CompareSpec(Strict):
    kind: Literal["compare"]
    name: str = Field(pattern=NAME)
    task: Literal["classification", "generation"]
    metric: str | None = Field(None, description="default: macro_f1 (classification), exact_match (generation)")
    data: DataSpec
    labels: dict[str, list[str]] | None = None
    instruction: str = ""
    bases: dict[str, ModelSpec] = Field(min_length=1)
    program: dict[str, Any] = Field(default_factory=dict)
    job: dict[str, Any] = Field(default_factory=dict)
    contenders: list[AnyContender] = Field(min_length=1)
    max_concurrent_trials: int = Field(2, gt=0)
    tracking: TrackingSpec = Field(default_factory=lambda: TrackingSpec(experiment="compare"))
    output: OutputSpec = Field(default_factory=OutputSpec)

    @model_validator(mode="after")
    def _cross_checks(self) -> CompareSpec:
        if self.metric is None:
            self.metric = "macro_f1" if self.task == "classification" else "exact_match"
        if self.task == "classification" and not self.labels:
            raise ValueError("labels: classification needs labels with their verbalizers")
        names = [c.name for c in self.contenders]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"contenders: name {dup!r} is used twice")
        for i, c in enumerate(self.contenders):
            if c.kind != "majority" and c.base not in self.bases:
                raise ValueError(f"contenders[{i}] ({c.name}): base {c.base!r} is not a key of bases "
                                 f"({', '.join(self.bases)})")
            if c.kind == "majority" and self.task != "classification":
                raise ValueError(f"contenders[{i}] ({c.name}): majority class needs task classification")
        return self

    def metric_name(self) -> str:
        return str(self.metric)


def load_compare(path: str | Path, overrides: list[str] | None = None, quick: bool = False) -> tuple[CompareSpec, Path]:
    """The spec and the folder its relative paths (job_file) are read from."""
    path = Path(path)
    raw = read_spec_mapping(path, "a compare spec", overrides)
    if quick:
        from onebase.compare.quick import cut_down

        raw = cut_down(raw)
    return parse_compare(raw, source=str(path)), path.parent


def parse_compare(raw: dict[str, Any], source: str = "spec") -> CompareSpec:
    return parse_kind(raw, KIND, CompareSpec, source)
