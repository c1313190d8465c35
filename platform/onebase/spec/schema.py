"""The job spec: one YAML document describes one training job.

Every model forbids unknown fields, so a typo in a spec fails before Ray starts.
Method-specific fields live under `method:` and are validated by the method's own
config class (spec/method_configs.py).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from onebase.spec import mixture as mix
from onebase.spec.base import MethodConfig, Strict
from onebase.spec.method_configs import check_method_task, method_config

# The task table (onebase.tasks) holds these; still importable from here.
from onebase.tasks import OPTIONAL_ROLES, TASK_COLUMNS, TaskName  # noqa: F401 - OPTIONAL_ROLES: still importable from here

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ModelSpec(Strict):
    name: str = Field(description="bundled name (minilm, smollm2-135m-instruct), local HF dir, or hub id")
    init: Literal["pretrained", "random"] = "pretrained"
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    revision: str | None = None

    @model_validator(mode="after")
    def _overrides_need_random_init(self) -> ModelSpec:
        if self.config_overrides and self.init == "pretrained":
            raise ValueError("config_overrides changes the architecture; it needs init: random")
        return self


class ValidationSpec(Strict):
    fraction: float = Field(0.1, gt=0, lt=1)
    path: str | None = None
    seed: int = Field(42, ge=0)
    max_samples: int | None = Field(None, gt=0)


class DataSpec(Strict):
    source: str = Field(description="bundled:tweet-sentiment, bundled:chat-pairs, or a .csv/.jsonl path; "
                                    "mixture: the sources under `mixture`")
    mixture: list[mix.MixtureSource] | None = Field(None, min_length=1, description="causal-lm instruction tuning")
    columns: dict[str, str] = Field(default_factory=dict)
    labels: list[str] | None = None
    max_samples: int | None = Field(None, gt=0)
    max_length: int = Field(128, ge=8, le=32768)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise ValueError("needs at least two distinct labels")
        return labels

    @model_validator(mode="after")
    def _mixture_or_source(self) -> DataSpec:
        mix.check_mixture(self.source, self.mixture)
        return self


class HeldOutTask(mix.HeldOutFields):
    """A task never trained on, scored zero-shot after training on the tuned model and on the base."""

    data: DataSpec

    @property
    def label(self) -> str:
        return self.name or mix.default_name(self.data.source)


class EvaluationSpec(mix.EvaluationFields):
    held_out: list[HeldOutTask] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> EvaluationSpec:
        mix.check_held_out_names([task.label for task in self.held_out])
        return self


class PromptSpec(Strict):
    template: str = Field(
        "chat", description="chat (the tokenizer's chat template), alpaca, or a string with {instruction} and {input}"
    )
    instruction: str | None = Field(None, description="used for rows whose data has no instruction column")
    system: str | None = None

    @field_validator("template")
    @classmethod
    def _template_has_slots(cls, template: str) -> str:
        if template not in ("chat", "alpaca") and "{input}" not in template and "{instruction}" not in template:
            raise ValueError("a custom template must contain {instruction} or {input}")
        return template


class TrainSpec(Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0, description="micro-batch per worker")
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = Field(42, ge=0)
    eval_every_steps: int | None = Field(None, gt=0)
    log_every_steps: int = Field(10, gt=0)
    eval_batch_size: int = Field(64, gt=0)


class ScalingSpec(Strict):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    max_failures: int = Field(2, ge=0, description="worker failures survived by restarting from the last checkpoint")

    @field_validator("resources_per_worker")
    @classmethod
    def _positive(cls, resources: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in resources.items() if v < 0]
        if bad:
            raise ValueError(f"negative amount for {', '.join(bad)}")
        return resources


OffloadDevice = Literal["cpu", "nvme"]


class DeepSpeedSpec(Strict):
    stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: OffloadDevice | None = Field(None, description="true or cpu: CPU memory; nvme: files "
                                                    "under nvme_path (ZeRO-3, DeepSpeed's async_io op); false: none")
    offload_param: OffloadDevice | None = Field(None, description="as offload_optimizer; needs stage 3")
    nvme_path: str | None = Field(None, description="an existing writable folder on a fast local disk, for nvme")
    gradient_accumulation_steps: int = Field(1, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    @field_validator("offload_optimizer", "offload_param", mode="before")
    @classmethod
    def _true_is_cpu(cls, value: Any) -> Any:
        """`true` (what specs said before nvme existed) offloads to CPU memory, `false` nowhere."""
        if isinstance(value, bool):
            return "cpu" if value else None
        if value is not None and value not in ("cpu", "nvme"):
            raise ValueError(f"{value!r}: use cpu, nvme, true (cpu) or false")
        return value

    @property
    def on_nvme(self) -> list[str]:
        """The offload fields set to nvme (what needs nvme_path and the async_io op)."""
        return [f for f in ("offload_optimizer", "offload_param") if getattr(self, f) == "nvme"]

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSpec:
        if self.offload_param and self.stage != 3:
            raise ValueError("offload_param needs stage 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs stage 1, 2 or 3")
        on_nvme = self.on_nvme
        if on_nvme and self.stage != 3:  # only ZeRO-3 has DeepSpeed's NVMe swappers
            raise ValueError(f"{on_nvme[0]}: nvme needs stage 3")
        if on_nvme and not self.nvme_path:
            raise ValueError(f"{on_nvme[0]}: nvme needs nvme_path (a folder on a fast local disk)")
        if self.nvme_path and not on_nvme:
            raise ValueError("nvme_path is used only with offload_optimizer: nvme or offload_param: nvme")
        if self.nvme_path and not self.nvme_path.startswith("/"):  # workers on other nodes resolve it too
            raise ValueError(f"nvme_path: {self.nvme_path} is not an absolute path")
        return self


class CheckpointSpec(Strict):
    every_steps: int | None = Field(None, gt=0, description="None: at each eval and at the end")
    keep: int = Field(2, gt=0)


class TrackingSpec(Strict):
    uri: str | None = Field(None, description="default: sqlite:///<cwd>/mlflow.db")
    experiment: str = "onebase"
    registered_model: str | None = Field(None, description="default: the job name")
    register_model: bool = True


class OutputSpec(Strict):
    path: str = "runs"


class JobSpec(Strict):
    name: str
    task: TaskName
    model: ModelSpec
    data: DataSpec
    # validate_default: a spec without `method:` gets a real MethodConfig for `full`, not a bare dict.
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: {"name": "full"}, validate_default=True)
    prompt: PromptSpec | None = None
    evaluation: EvaluationSpec | None = None
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 100, starting with a letter or digit)")
        return name

    @field_validator("method", mode="before")
    @classmethod
    def _method_from_registry(cls, value: Any) -> MethodConfig:
        return method_config(value)

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        if self.prompt is not None and self.task != "causal-lm":
            raise ValueError("prompt: only the causal-lm task uses a prompt template")
        if self.data.mixture and self.task != "causal-lm":
            raise ValueError(f"data.mixture: instruction-tuning mixtures train causal-lm, not {self.task}")
        if self.data.mixture and self.data.columns:
            raise ValueError("data.columns: with a mixture each source maps its own columns")
        if self.task == "causal-lm" and self.prompt is None:
            self.prompt = PromptSpec()
        roles = TASK_COLUMNS[self.task]
        unknown = sorted(set(self.data.columns) - set(roles))
        if unknown:
            raise ValueError(f"data.columns: unknown role {unknown[0]!r} for task {self.task} "
                             f"(roles: {', '.join(roles)})")
        check_method_task(self.method, self.task)
        return self

    def column(self, role: str) -> str:
        """The data column that holds `role`, after the spec's column mapping."""
        return self.data.columns.get(role) or TASK_COLUMNS[self.task][role]
