"""A prompt program: everything needed to run it on its base, with no reference to the spec file.

The program is what gets saved, registered and served: the instruction, the template, the chosen
demonstrations (text), scoring, calibration (with the content-free probabilities once computed),
reasoning, self-consistency and the answer extractor.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from onebase.prompt.adapter import AdapterRef
from onebase.prompt.spec import CalibrationSpec, ExtractorSpec, ReasoningSpec, SelfConsistencySpec

METHOD = "prompt-program"


class Demo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str
    answer: str  # the label (classification) or the gold answer (generation)
    rationale: str | None = None  # few-shot chain-of-thought: the worked solution before the answer


class Calibration(CalibrationSpec):
    p_cf: list[float] | None = Field(
        None, description="content-free label probabilities (order of `labels`), measured once at eval/search")


class Program(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    base: str
    base_sha256: str  # the frozen base's, also when an adapter runs on it
    adapter: AdapterRef | None = None  # the training export the program runs on (merged into the base)
    task: Literal["classification", "generation"]
    labels: dict[str, list[str]] | None = None  # label -> verbalizers, in label order
    instruction: str = ""
    system: str | None = None
    template: str = "chat"
    demos: list[Demo] = Field(default_factory=list)
    # "fixed": `demos` go in every prompt (and are prefix-cached); "similar": the k nearest
    # neighbours of each query among `demo_pool`, by the base's mean-pooled hidden states.
    demo_selection: Literal["fixed", "similar"] = "fixed"
    demo_pool: list[Demo] = Field(default_factory=list)
    k: int = 0
    scoring: Literal["loglik", "generate"] = "loglik"
    calibration: Calibration = Field(default_factory=Calibration)
    reasoning: ReasoningSpec = Field(default_factory=ReasoningSpec)
    self_consistency: SelfConsistencySpec = Field(default_factory=SelfConsistencySpec)
    extractor: ExtractorSpec = Field(default_factory=ExtractorSpec)
    max_new_tokens: int = 16

    @property
    def label_names(self) -> list[str]:
        return list(self.labels or {})

    @property
    def is_classification(self) -> bool:
        return self.task == "classification"
