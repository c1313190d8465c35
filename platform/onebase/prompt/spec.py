"""The prompt-program spec: one YAML document describes one program on one frozen base.

`kind: prompt-program` tells it apart from job and sweep specs. The `data:` block is the job
spec's own (same loader, same split), so a program is evaluated on exactly the rows a fine-tune
of the same task is evaluated on. Every model forbids unknown fields.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from onebase.spec.load import parse_kind, read_spec_mapping
from onebase.spec.schema import DataSpec, JobSpec, OutputSpec, Strict, TrackingSpec

KIND = "prompt-program"
QUERY_SLOT = "input"
COT_TRIGGER = "Let's think step by step."


class DemoSpec(Strict):
    k: int = Field(0, ge=0, le=64)
    selection: Literal["random", "balanced", "similar"] = "random"
    seed: int = 0
    order: Literal["as-drawn", "shuffled", "by-label"] = "as-drawn"
    labels: Literal["gold", "random"] = "gold"
    pool: int = Field(2000, gt=0, description="similar: the first `pool` training rows are candidates")


class CalibrationSpec(Strict):
    mode: Literal["none", "contextual"] = "none"
    content_free: list[str] = Field(default_factory=lambda: ["N/A", "", "[MASK]"], min_length=1)


class SelfConsistencySpec(Strict):
    samples: int = Field(1, ge=1, le=64)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 0


class ExtractorSpec(Strict):
    kind: Literal["regex", "last-number", "first-line", "label"] = "first-line"
    pattern: str | None = Field(None, description="regex: the answer is group 1 (or the whole match)")

    @model_validator(mode="after")
    def _pattern_compiles(self) -> ExtractorSpec:
        if self.kind == "regex":
            if not self.pattern:
                raise ValueError("kind regex needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern {self.pattern!r} does not compile: {err}") from None
        elif self.pattern is not None:
            raise ValueError(f"pattern is only for kind regex, not {self.kind}")
        return self


class ReasoningSpec(Strict):
    mode: Literal["direct", "cot", "least-to-most"] = "direct"
    trigger: str = COT_TRIGGER
    answer_prompt: str = "Therefore, the answer is"
    decompose_prompt: str = ("Break this problem into simpler sub-questions, one per line, "
                             "each ending with a question mark.")
    max_subquestions: int = Field(4, ge=1, le=16)
    max_reasoning_tokens: int = Field(96, ge=1, le=2048)


class SearchSpec(Strict):
    """Automatic prompt engineering (Zhou et al. 2022), for `onebase prompt search`."""

    candidates: int = Field(8, ge=1, le=200, description="instructions proposed from demo subsets")
    demos_per_proposal: int = Field(5, ge=1, le=32)
    dev_rows: int = Field(40, ge=2, description="a slice of the training split that scores candidates")
    top: int = Field(3, ge=1, description="best candidates resampled into variations")
    variations: int = Field(2, ge=0, le=20, description="variations per top candidate")
    report_top: int = Field(5, ge=1, description="found instructions also scored on the evaluation rows")
    temperature: float = Field(0.9, gt=0)
    max_new_tokens: int = Field(32, ge=4, le=256)
    seed: int = 0


class ProgramSpec(Strict):
    kind: Literal["prompt-program"]
    name: str
    base: str = Field(description="bundled name, local HF dir or hub id of a causal LM")
    base_init: Literal["pretrained", "random"] = "pretrained"
    base_config_overrides: dict[str, Any] = Field(default_factory=dict)
    adapter: str | None = Field(
        None, description="an onebase training export (PEFT adapter or full model dir) trained on `base`: "
                          "the program runs on base + adapter")
    task: Literal["classification", "generation"]
    labels: dict[str, list[str]] | None = Field(
        None, description="classification: label -> verbalizer strings (null: the label itself)")
    data: DataSpec
    instruction: str = ""
    system: str | None = None
    template: str = Field("chat", description="chat, or a string with the query slot {input}")
    demos: DemoSpec = Field(default_factory=DemoSpec)
    scoring: Literal["loglik", "generate"] = "loglik"
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    reasoning: ReasoningSpec = Field(default_factory=ReasoningSpec)
    self_consistency: SelfConsistencySpec = Field(default_factory=SelfConsistencySpec)
    extractor: ExtractorSpec = Field(default_factory=ExtractorSpec)
    max_new_tokens: int = Field(16, ge=1, le=2048)
    batch_size: int = Field(8, gt=0)
    workers: int = Field(1, gt=0, description="Ray actors evaluating in parallel (one model load each)")
    cpus_per_worker: float = Field(1, gt=0)
    search: SearchSpec = Field(default_factory=SearchSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    # The job spec's own rule (a program's name becomes a folder and a registered model name too).
    _name_is_safe = field_validator("name")(classmethod(JobSpec._name_is_safe.__func__))

    @field_validator("adapter")
    @classmethod
    def _adapter_is_absolute(cls, adapter: str | None) -> str | None:
        # Resolved against the directory the spec is used from: Ray actors may run elsewhere.
        if adapter is None:
            return None
        if not adapter.strip():
            raise ValueError("an empty path (leave the field out for the bare base)")
        return str(Path(adapter).expanduser().resolve())

    @field_validator("template")
    @classmethod
    def _template_has_query_slot(cls, template: str) -> str:
        if template == "chat":
            return template
        try:
            slots = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as err:
            raise ValueError(f"not a valid format string: {err}") from None
        if QUERY_SLOT not in slots:
            raise ValueError("a custom template needs the query slot {input}")
        unknown = slots - {QUERY_SLOT, "instruction"}
        if unknown:
            raise ValueError(f"unknown slot {{{sorted(unknown)[0]}}} (slots: {{instruction}}, {{input}})")
        return template

    @field_validator("labels")
    @classmethod
    def _verbalizers(cls, labels: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        if labels is None:
            return None
        if len(labels) < 2:
            raise ValueError("needs at least two labels")
        for label, words in labels.items():
            if not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"label {label!r} has no verbalizer (give it a list of one or more strings)")
        return labels

    @model_validator(mode="after")
    def _cross_checks(self) -> ProgramSpec:
        if self.task == "classification":
            if not self.labels:
                raise ValueError("labels: classification needs labels with their verbalizers")
            if self.data.labels and set(self.data.labels) != set(self.labels):
                raise ValueError("labels: must name the same labels as data.labels")
        elif self.labels:
            raise ValueError("labels: only for task classification")
        if self.calibration.mode != "none" and (self.task != "classification" or self.scoring != "loglik"
                                                 or self.reasoning.mode != "direct"):
            raise ValueError("calibration: contextual calibration needs classification with scoring loglik "
                             "and reasoning direct")
        if (self.task == "classification" and self.scoring == "loglik" and self.reasoning.mode == "direct"
                and self.self_consistency.samples > 1):
            raise ValueError("self_consistency: sampling needs scoring generate or a reasoning mode "
                             "(loglik scoring of a direct answer has nothing to sample)")
        if self.reasoning.mode == "least-to-most" and self.task != "generation":
            raise ValueError("reasoning: least-to-most is for generation tasks")
        if self.base_config_overrides and self.base_init == "pretrained":
            raise ValueError("base_config_overrides changes the architecture; it needs base_init: random")
        return self

    def job_spec(self) -> JobSpec:
        """The job spec whose data loader reads this program's rows (the same split a fine-tune gets)."""
        task = "sequence-classification" if self.task == "classification" else "causal-lm"
        data = self.data.model_dump()
        model = {"name": self.base, "init": self.base_init, "config_overrides": self.base_config_overrides}
        raw = {"name": self.name, "task": task, "model": model, "data": data}
        if task == "causal-lm":
            raw["prompt"] = {"instruction": self.instruction or None}
        return JobSpec.model_validate(raw)


def load_program_spec(path: str | Path, overrides: list[str] | None = None) -> ProgramSpec:
    path = Path(path)
    return parse_program_spec(read_spec_mapping(path, "a program spec", overrides), source=str(path))


def parse_program_spec(raw: dict[str, Any], source: str = "spec") -> ProgramSpec:
    return parse_kind(raw, KIND, ProgramSpec, source)
