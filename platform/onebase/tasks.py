"""The task table: what onebase knows about each task, in one place.

The job spec (task names, column roles), the methods (which tasks each supports, PEFT's task
types), model building (the transformers Auto class), evaluation (the metrics a task reports) and
serving (the route a task answers on, reading PEFT adapters made elsewhere) all read this table.
It imports nothing of onebase, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# What evaluation compares (train/evaluate.py): one label per row, a (start, end) span per row, a
# label per position, or the next token at every response position.
Scoring = Literal["label", "span", "position", "next-token"]
TaskName = Literal["sequence-classification", "token-classification", "extractive-qa", "causal-lm"]


@dataclass(frozen=True)
class Task:
    name: str
    # Column roles read from a user CSV/JSONL, with their default column names ("" : none by default).
    columns: dict[str, str]
    optional_roles: frozenset[str]  # roles whose column may be absent from the data
    auto_class: str  # the transformers Auto class holding the task's head
    peft_task_type: str  # PEFT's TaskType
    route: str  # the serving endpoint a request for this task goes to
    metrics: tuple[str, ...]  # what evaluation reports besides eval_loss
    scoring: Scoring
    # Every input position carries a label: soft prompts (extra positions) would shift them.
    labels_per_position: bool = False
    # A classification head over a label set (num_labels, id2label on the model config).
    label_head: bool = field(default=False)


TASKS: dict[str, Task] = {
    "sequence-classification": Task(
        name="sequence-classification", columns={"text": "text", "text_pair": "", "label": "label"},
        optional_roles=frozenset({"text_pair"}), auto_class="AutoModelForSequenceClassification",
        peft_task_type="SEQ_CLS", route="/v1/classify", metrics=("accuracy", "macro_f1"), scoring="label",
        label_head=True),
    "token-classification": Task(
        name="token-classification", columns={"tokens": "tokens", "tags": "tags"}, optional_roles=frozenset(),
        auto_class="AutoModelForTokenClassification", peft_task_type="TOKEN_CLS", route="/v1/tag",
        metrics=("accuracy", "macro_f1"), scoring="position", labels_per_position=True, label_head=True),
    "extractive-qa": Task(
        name="extractive-qa",
        columns={"question": "question", "context": "context", "answer": "answer", "answer_start": "answer_start"},
        optional_roles=frozenset(), auto_class="AutoModelForQuestionAnswering", peft_task_type="QUESTION_ANS",
        route="/v1/answer", metrics=("exact_match",), scoring="span", labels_per_position=True),
    "causal-lm": Task(
        name="causal-lm", columns={"instruction": "instruction", "input": "input", "response": "response"},
        optional_roles=frozenset({"instruction", "input"}), auto_class="AutoModelForCausalLM",
        peft_task_type="CAUSAL_LM", route="/v1/completions", metrics=("perplexity", "exact_match"),
        scoring="next-token"),
}

ALL_TASKS = frozenset(TASKS)
# Soft prompts (prompt tuning, P-tuning) add input positions: only tasks without per-position labels.
SOFT_PROMPT_TASKS = frozenset(name for name, task in TASKS.items() if not task.labels_per_position)
TASK_COLUMNS: dict[str, dict[str, str]] = {name: task.columns for name, task in TASKS.items()}
OPTIONAL_ROLES = frozenset(role for task in TASKS.values() for role in task.optional_roles)
PEFT_TASK_TYPES: dict[str, str] = {name: task.peft_task_type for name, task in TASKS.items()}
AUTO_CLASSES: dict[str, str] = {name: task.auto_class for name, task in TASKS.items()}
ROUTES: dict[str, str] = {name: task.route for name, task in TASKS.items()}


def task_of_peft_type(peft_task_type: str | None, default: str = "causal-lm") -> str:
    """The onebase task of a PEFT adapter's `task_type` (adapters made outside onebase name only that)."""
    by_type = {task.peft_task_type: name for name, task in TASKS.items()}
    return by_type.get(str(peft_task_type), default)
