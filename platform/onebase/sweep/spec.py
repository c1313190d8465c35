"""The sweep spec: a base job, the methods to pit against each other, and their search spaces.

```yaml
name: tweet-adapters
job: tweet-sentiment-lora.yaml          # the base job (relative to this file), or `base:` inline
metric: macro_f1                        # an eval metric the job reports
mode: max
samples_per_method: 2
methods:                                # per-method space: plain keys are the method's own fields,
  lora: {r: [8, 16], train.learning_rate: {loguniform: [5.0e-4, 3.0e-3]}}   # dotted keys job fields
  ia3: {}
search:                                 # shared by every method (dotted job fields)
  train.epochs: [1, 2]
```
A list is a choice; `{loguniform|uniform: [lo, hi]}` and `{randint: [lo, hi]}` are ranges;
anything else is a fixed value. Trials are drawn here, seeded, so a sweep is reproducible.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from onebase.errors import SpecError
from onebase.spec.load import apply_override, describe, parse_spec, read_yaml, set_dotted
from onebase.spec.schema import JobSpec, Strict

RANGES = {"loguniform", "uniform", "randint"}


class SchedulerSpec(Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, gt=0, description="evaluations every trial gets before it can be stopped")
    reduction_factor: float = Field(2, gt=1)


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    job: str | None = None
    base: dict[str, Any] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted job fields set on every trial")
    metric: str = "macro_f1"
    mode: Literal["max", "min"] = "max"
    methods: dict[str, dict[str, Any]]
    search: dict[str, Any] = Field(default_factory=dict)
    samples_per_method: int = Field(1, gt=0, le=100)
    max_concurrent_trials: int = Field(2, gt=0)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    seed: int = 0
    register_best: bool = True

    @model_validator(mode="after")
    def _one_base(self) -> SweepSpec:
        if (self.job is None) == (self.base is None):
            raise ValueError("give exactly one of job (a job spec file) or base (an inline job spec)")
        if not self.methods:
            raise ValueError("methods: empty search space (name at least one method)")
        return self


def load_sweep(path: str | Path) -> tuple[SweepSpec, dict[str, Any]]:
    """Read and check a sweep; returns it with the base job as a dict. Every trial is validated here."""
    path = Path(path)
    raw = read_yaml(path, missing=f"sweep file not found: {path}")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep spec is a YAML mapping")
    try:
        sweep = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"{path}: {describe(err)}") from None
    base = sweep.base if sweep.base is not None else read_job(path.parent / str(sweep.job))
    base = copy.deepcopy(base)
    for key, value in sweep.overrides.items():
        apply_override(base, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    check(sweep, base, str(path))
    return sweep, base


def read_job(path: Path) -> dict[str, Any]:
    raw = read_yaml(path, missing=f"job: file not found: {path}")
    if not isinstance(raw, dict):
        raise SpecError(f"job: {path} is not a YAML mapping")
    return raw


def check(sweep: SweepSpec, base: dict[str, Any], source: str) -> None:
    """Fail before Tune starts: unknown method, a field the method lacks, empty ranges, bad combos."""
    from onebase.spec.method_configs import METHOD_CONFIGS  # the schemas alone: no torch, no PEFT

    for method, space in sweep.methods.items():
        if method not in METHOD_CONFIGS:
            raise SpecError(f"{source}: methods.{method}: unknown method (known: {', '.join(sorted(METHOD_CONFIGS))})")
        fields = set(METHOD_CONFIGS[method].model_fields) - {"name"}
        for key, value in space.items():
            if "." not in key and key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise SpecError(f"{source}: methods.{method}.{key}: not a hyperparameter of method {method} "
                                f"(its fields: {known})")
            check_domain(f"methods.{method}.{key}", value, source)
    for key, value in sweep.search.items():
        if "." not in key or key.startswith("method."):
            raise SpecError(f"{source}: search.{key}: shared keys are dotted job fields (e.g. train.learning_rate);"
                            f" method fields go under methods.<name>")
        check_domain(f"search.{key}", value, source)
    # Validate the corners of each method's space as complete job specs (catches bad fields,
    # bad values and method/task combinations with the job's own one-line messages).
    for method in sweep.methods:
        for trial in corner_trials(sweep, method):
            try:
                parse_spec(trial_job(base, trial), source=f"methods.{method}")
            except SpecError as err:
                raise SpecError(f"{source}: {err}") from None
    if sweep.scheduler.type == "asha" and not parse_spec(base).train.eval_every_steps:
        raise SpecError(f"{source}: scheduler asha needs the job's train.eval_every_steps (it stops trials "
                        f"between evaluations)")


def check_domain(where: str, value: Any, source: str) -> None:
    if isinstance(value, list) and not value:
        raise SpecError(f"{source}: {where}: empty list of choices")
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in RANGES:
        kind, bounds = next(iter(value.items()))
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds)):
            raise SpecError(f"{source}: {where}: {kind} needs [low, high]")
        low, high = bounds
        if low > high or (kind == "loguniform" and low <= 0):
            raise SpecError(f"{source}: {where}: empty {kind} range [{low}, {high}]")


def sample(value: Any, rng: random.Random) -> Any:
    if isinstance(value, list):
        return rng.choice(value)
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in RANGES:
        kind, (low, high) = next(iter(value.items()))
        if kind == "randint":
            return rng.randint(int(low), int(high))
        if kind == "uniform":
            return rng.uniform(low, high)
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return value


def corner(value: Any, pick: int) -> Any:
    """The low (pick=0) or high (pick=-1) end of a domain, for validation."""
    if isinstance(value, list):
        return value[pick]
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in RANGES:
        bound = next(iter(value.values()))[pick]
        return int(bound) if next(iter(value)) == "randint" else bound
    return value


def space_of(sweep: SweepSpec, method: str) -> dict[str, Any]:
    """Job-level keys (method fields become method.<field>); method entries win over shared ones."""
    space = dict(sweep.search)
    space.update({(k if "." in k else f"method.{k}"): v for k, v in sweep.methods[method].items()})
    return space


def corner_trials(sweep: SweepSpec, method: str) -> list[dict[str, Any]]:
    space = space_of(sweep, method)
    return [{"method": method, "overrides": {k: corner(v, pick) for k, v in space.items()}} for pick in (0, -1)]


def draw_trials(sweep: SweepSpec) -> list[dict[str, Any]]:
    """samples_per_method trials per method, in a seeded order that interleaves methods."""
    rng = random.Random(sweep.seed)
    trials = []
    for index in range(sweep.samples_per_method):
        for method in sweep.methods:
            overrides = {k: sample(v, rng) for k, v in space_of(sweep, method).items()}
            trials.append({"method": method, "overrides": overrides, "index": index})
    return trials


def trial_job(base: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    """The base job with the trial's method and overrides applied (a plain dict, ready to validate)."""
    job = copy.deepcopy(base)
    keep = job.get("method") if isinstance(job.get("method"), dict) else {}
    # Fields of the base job's method only carry over when the trial uses the same method.
    job["method"] = dict(keep) if keep.get("name") == trial["method"] else {"name": trial["method"]}
    for key, value in trial["overrides"].items():
        set_dotted(job, key, value)
    return job


def trial_spec(base: dict[str, Any], trial: dict[str, Any]) -> JobSpec:
    return parse_spec(trial_job(base, trial), source=f"trial {trial['method']}")
