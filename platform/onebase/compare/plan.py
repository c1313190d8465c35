"""From a compare spec to rows, each checked before Ray starts: a prompt row is a list of program
specs (one per seed), a training row a sweep over the learning rate, a generalist a job + a
program on its export. Every check raises a one-line SpecError (exit 2)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onebase.compare.spec import CompareSpec, Contender
from onebase.errors import SpecError
from onebase.spec.load import read_spec_mapping, set_dotted


@dataclass
class Row:
    name: str  # the report's row name (a contender, or one cell of a k-shot grid)
    kind: str  # majority | program | icl | ape | train | generalist
    base: str | None  # the base's model name
    params: dict[str, Any] = field(default_factory=dict)  # what the report groups by (k, labels, calibration)
    programs: list[Any] = field(default_factory=list)  # ProgramSpec per seed (prompt rows, generalist)
    sweep: Any = None  # SweepSpec (training rows)
    job: dict[str, Any] | None = None  # the job dict (training rows: the sweep's base; generalist: its job)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of spec fragments: mappings merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def program_raw(spec: CompareSpec, contender: Contender, name: str) -> dict[str, Any]:
    model = spec.bases[contender.base]
    raw = {"kind": "prompt-program", "name": name, "base": model.name, "base_init": model.init,
           "base_config_overrides": model.config_overrides, "task": spec.task, "labels": spec.labels,
           "data": spec.data.model_dump(exclude_none=True), "instruction": spec.instruction,
           "tracking": {"experiment": spec.tracking.experiment, "uri": spec.tracking.uri,
                        "registered_model": f"{spec.name}-{contender.name}"},
           "output": {"path": str(Path(spec.output.path) / spec.name / "programs")}}
    return merge(merge(raw, spec.program), contender.program)


def parse_program(raw: dict[str, Any], where: str):
    from onebase.prompt.spec import parse_program_spec

    try:
        return parse_program_spec(raw, source=where)
    except SpecError as err:
        raise SpecError(f"{err}") from None


def seeded(raw: dict[str, Any], seed: int, where: str):
    return parse_program(merge(raw, {"name": f"{raw['name']}-s{seed}", "demos": {"seed": seed},
                                     "self_consistency": {"seed": seed}}), where)


def job_raw(spec: CompareSpec, contender: Contender) -> dict[str, Any]:
    """The training row's job: this task's data on this base, the shared `job:` fields, its method."""
    task = "sequence-classification" if spec.task == "classification" else "causal-lm"
    raw = {"name": f"{spec.name}-{contender.name}", "task": task,
           "model": spec.bases[contender.base].model_dump(exclude_none=True),
           "data": spec.data.model_dump(exclude_none=True),
           "tracking": {"experiment": spec.tracking.experiment, "uri": spec.tracking.uri,
                        "registered_model": f"{spec.name}-{contender.name}"},
           "output": {"path": str(Path(spec.output.path) / spec.name / "train")}}
    if task == "causal-lm":
        raw["prompt"] = {"instruction": spec.instruction or None}
    raw = merge(raw, spec.job)
    for key, value in getattr(contender, "job", {}).items():
        set_dotted(raw, key, value)
    return raw


def plan(spec: CompareSpec, folder: Path) -> list[Row]:
    rows: list[Row] = []
    for i, c in enumerate(spec.contenders):
        where = f"contenders[{i}] ({c.name})"
        base = spec.bases[c.base].name if c.base else None
        if c.kind == "majority":
            rows.append(Row(c.name, "majority", None))
        elif c.kind == "program":
            raw = program_raw(spec, c, f"{spec.name}-{c.name}")
            programs = [seeded(raw, s, where) for s in c.seeds]
            rows.append(Row(c.name, "program", base, program_params(programs[0]), programs))
        elif c.kind == "icl":
            rows += icl_rows(spec, c, where, base)
        elif c.kind == "ape":
            program = parse_program(program_raw(spec, c, f"{spec.name}-{c.name}"), where)
            rows.append(Row(c.name, "ape", base, program_params(program), [program]))
        elif c.kind == "train":
            rows.append(train_row(spec, c, where, base))
        else:
            rows.append(generalist_row(spec, c, where, base, folder))
    return rows


def program_params(program) -> dict[str, Any]:
    return {"k": program.demos.k, "demo_labels": program.demos.labels, "calibration": program.calibration.mode,
            "reasoning": program.reasoning.mode, "samples": program.self_consistency.samples}


def icl_rows(spec: CompareSpec, c, where: str, base: str) -> list[Row]:
    rows = []
    for k in c.k:
        for labels in c.labels:
            for calibration in c.calibration:
                name = f"{c.name}-k{k}-{labels}" + ("-cal" if calibration == "contextual" else "")
                raw = merge(program_raw(spec, c, f"{spec.name}-{name}"),
                            {"demos": {"k": k, "labels": labels}, "calibration": {"mode": calibration}})
                programs = [seeded(raw, s, where) for s in c.seeds]
                rows.append(Row(name, "icl", base, program_params(programs[0]), programs))
    return rows


def train_row(spec: CompareSpec, c, where: str, base: str) -> Row:
    from onebase.sweep.spec import SweepSpec, check

    job = job_raw(spec, c)
    # Fixed values: a list in a sweep space is a choice, so each field is a choice of one.
    fields = {k: [v] for k, v in c.method.items() if k != "name"}
    if "name" not in c.method:
        raise SpecError(f"{where}: method: needs a name (e.g. {{name: lora}})")
    job["method"] = {"name": c.method["name"]}
    lr = {"train.learning_rate": {"loguniform": list(c.learning_rate)}}
    sweep = SweepSpec.model_validate({
        "name": f"{spec.name}-{c.name}", "base": job, "metric": spec.metric_name(), "mode": "max",
        "methods": {c.method["name"]: {**fields, **lr}}, "samples_per_method": c.draws,
        "max_concurrent_trials": spec.max_concurrent_trials, "scheduler": {"type": "none"}, "seed": c.seed})
    check(sweep, job, where)  # unknown method or field, bad values: the sweep's own one-line messages
    return Row(c.name, "train", base, {"method": c.method["name"], "draws": c.draws}, sweep=sweep, job=job)


def generalist_row(spec: CompareSpec, c, where: str, base: str, folder: Path) -> Row:
    from onebase.spec.load import parse_spec

    if c.export is not None:  # trained once elsewhere: only scored here (prepare() checks its base)
        export = folder / Path(c.export).expanduser()
        raw = merge(program_raw(spec, c, f"{spec.name}-{c.name}"), {"adapter": str(export)})
        program = parse_program(raw, where)
        return Row(c.name, "generalist", base, program_params(program), [program])
    path = folder / c.job_file
    job = read_spec_mapping(path, "a job spec")
    for key, value in c.job.items():
        set_dotted(job, key, value)
    job_spec = parse_spec(job, source=f"{where}: {c.job_file}")
    if job_spec.task != "causal-lm":
        raise SpecError(f"{where}: {c.job_file} is a {job_spec.task} job; a generalist is a causal-lm tune")
    model = spec.bases[c.base]
    if job_spec.model.model_dump() != model.model_dump():
        raise SpecError(f"{where}: {c.job_file} trains {job_spec.model.name}, not base {c.base} ({model.name})")
    # The export path is known before training: `adapter:` is filled in once the job has run.
    program = parse_program(program_raw(spec, c, f"{spec.name}-{c.name}"), where)
    return Row(c.name, "generalist", base, program_params(program), [program], job=job)


def majority_job(spec: CompareSpec):
    """A job spec whose loader reads this task's rows (the majority row trains nothing)."""
    from onebase.spec.load import parse_spec

    return parse_spec({"name": f"{spec.name}-majority", "task": "sequence-classification",
                       "model": next(iter(spec.bases.values())).model_dump(exclude_none=True),
                       "data": spec.data.model_dump(exclude_none=True)}, source="majority")


def check_before_ray(spec: CompareSpec, rows: list[Row]) -> int:
    """Bases resolve, each method runs on its base, the rows load (columns, labels, k fits); returns
    how many evaluation rows every contender is scored on."""
    from onebase.data.sources import load_dataset
    from onebase.model.assets import check_model_available
    from onebase.prompt.evaluate import prepare
    from onebase.spec.load import parse_spec
    from onebase.sweep.spec import draw_trials, trial_spec
    from onebase.train.preflight import check_method_base

    sizes = set()
    for row in rows:
        if row.kind == "majority":
            sizes.add(len(load_dataset(majority_job(spec)).validation))
        elif row.kind in ("program", "icl", "ape"):
            sizes.add(len(prepare(row.programs[0]).queries))
        elif row.kind == "train":
            first = trial_spec(row.job, draw_trials(row.sweep)[0])
            model_path = check_model_available(first.model.name, first.model.revision)
            check_method_base(first, model_path)
            sizes.add(len(load_dataset(first).validation))
        elif row.kind == "generalist":
            from onebase.train.heldout import check_held_out

            if row.job is not None:
                job = parse_spec(row.job)
                check_model_available(job.model.name, job.model.revision)
                check_held_out(job)
            sizes.add(len(prepare(row.programs[0]).queries))
    if len(sizes) > 1:
        raise SpecError(f"contenders are evaluated on different numbers of rows {sorted(sizes)}: check data:")
    return sizes.pop() if sizes else 0
