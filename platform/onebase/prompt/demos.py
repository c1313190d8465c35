"""Build a Program from its spec: demonstrations from the training split only.

Selection `random` draws k rows; `balanced` cycles over the labels (k // labels each, the rest to
the first labels); `similar` keeps a pool of training rows and lets the runner pick each query's
nearest neighbours. `labels: random` replaces each demo's gold label by a random one (the ablation
of Min et al. 2022). Order `shuffled` shuffles the drawn demos, `by-label` groups them.
"""

from __future__ import annotations

import random
from typing import Any

from onebase.errors import SpecError
from onebase.prompt.program import Calibration, Demo, Program
from onebase.prompt.spec import ProgramSpec


def row_demo(row: dict[str, Any], classification: bool) -> Demo:
    if classification:
        return Demo(input=row["text"], answer=row["label"], rationale=row.get("rationale"))
    query = "\n\n".join(p for p in (row.get("instruction"), row.get("input")) if p)
    return Demo(input=query, answer=row["response"], rationale=row.get("rationale"))


def row_query(row: dict[str, Any], classification: bool) -> tuple[str, str]:
    """(query text, gold answer) of an evaluation row."""
    demo = row_demo(row, classification)
    return demo.input, demo.answer


def check_demo_count(spec: ProgramSpec, train_rows: int) -> None:
    if spec.demos.k > train_rows:
        raise SpecError(f"demos.k: {spec.demos.k} demonstrations asked, the training split has only "
                        f"{train_rows} rows")


def select_demos(spec: ProgramSpec, train: list[dict[str, Any]], labels: list[str] | None) -> list[Demo]:
    classification = spec.task == "classification"
    rng = random.Random(spec.demos.seed)
    k = spec.demos.k
    if k == 0:
        return []
    if spec.demos.selection == "balanced" and classification and labels:
        by_label = {label: [r for r in train if r["label"] == label] for label in labels}
        for rows in by_label.values():
            rng.shuffle(rows)
        picked, turn = [], 0
        while len(picked) < k and any(by_label.values()):
            rows = by_label[labels[turn % len(labels)]]
            if rows:
                picked.append(rows.pop())
            turn += 1
    else:
        picked = rng.sample(train, k)
    demos = [row_demo(r, classification) for r in picked]
    if spec.demos.labels == "random":
        answers = labels if classification and labels else [d.answer for d in demos]
        demos = [d.model_copy(update={"answer": rng.choice(answers)}) for d in demos]
    if spec.demos.order == "shuffled":
        rng.shuffle(demos)
    elif spec.demos.order == "by-label":
        demos.sort(key=lambda d: d.answer)
    return demos


def build_program(spec: ProgramSpec, train: list[dict[str, Any]], labels: list[str] | None,
                  base_sha256: str, instruction: str | None = None) -> Program:
    """The program the spec describes, its demonstrations drawn from `train` (the training split)."""
    check_demo_count(spec, len(train))
    classification = spec.task == "classification"
    similar = spec.demos.selection == "similar" and spec.demos.k > 0
    verbalizers = None
    if classification:
        verbalizers = {label: list(spec.labels.get(label) or [label]) for label in (labels or list(spec.labels))}
    pool = [row_demo(r, classification) for r in train[: spec.demos.pool]] if similar else []
    if similar and spec.demos.labels == "random":
        rng = random.Random(spec.demos.seed)
        answers = list(verbalizers) if verbalizers else [d.answer for d in pool]
        pool = [d.model_copy(update={"answer": rng.choice(answers)}) for d in pool]
    adapter = None
    if spec.adapter:
        from onebase.prompt.adapter import reference

        adapter = reference(spec.adapter)
    return Program(
        name=spec.name, base=spec.base, base_sha256=base_sha256, adapter=adapter, task=spec.task, labels=verbalizers,
        instruction=spec.instruction if instruction is None else instruction, system=spec.system,
        template=spec.template, demos=[] if similar else select_demos(spec, train, labels),
        demo_selection="similar" if similar else "fixed", demo_pool=pool, k=spec.demos.k,
        scoring=spec.scoring, calibration=Calibration(**spec.calibration.model_dump()),
        reasoning=spec.reasoning, self_consistency=spec.self_consistency, extractor=spec.extractor,
        max_new_tokens=spec.max_new_tokens,
    )
