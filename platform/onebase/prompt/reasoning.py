"""Reasoning strategies on a ProgramRunner: chain-of-thought (zero- and few-shot) and least-to-most.

Zero-shot CoT (Kojima et al. 2022): the trigger ("Let's think step by step.") starts the answer, the
model writes its reasoning, then the answer-extraction prompt ("Therefore, the answer is") asks for
the answer. Few-shot CoT (Wei et al. 2022): the demonstrations carry rationales, the model writes
its own and the answer follows the same words. Least-to-most (Zhou et al. 2022): a decomposition
prompt lists sub-questions, which are solved in order with each answer appended, the original
question last. Self-consistency samples n reasoning paths and votes over their answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onebase.prompt.lm import PrefixLM, Sampling
from onebase.prompt.render import head_ids, render, text_ids

if TYPE_CHECKING:
    from onebase.prompt.runner import Prediction, ProgramRunner


def chain_of_thought(runner: ProgramRunner, rows: list[list[int]]) -> list[Prediction]:
    program = runner.program
    few_shot = any(d.rationale for d in program.demos) and program.k > 0
    trigger = [] if few_shot else text_ids(runner.tokenizer, runner.lead + program.reasoning.trigger)
    n, sampling = runner.sampling()
    starts = [r + trigger for r in rows] * n
    reasons = runner.lm.generate(starts, program.reasoning.max_reasoning_tokens, runner.stop_ids, sampling)
    texts = [runner.decode(o) for o in reasons]
    if few_shot:  # the answer follows the rationale's closing words, as in the demonstrations
        answers = [runner.answer_of(after(t, program.reasoning.answer_prompt)) for t in texts]
    else:
        # Second stage: the reasoning, then the answer-extraction prompt; the answer is scored
        # (classification) or generated greedily (generation).
        asks = [s + o + text_ids(runner.tokenizer, " " + program.reasoning.answer_prompt)
                for s, o in zip(starts, reasons)]
        if program.is_classification and program.scoring == "loglik":
            labels = program.label_names
            answers = [labels[max(range(len(labels)), key=p.__getitem__)]
                       for p in runner._label_probs(asks, lead=" ")]
        else:
            finals = runner.lm.generate(asks, program.max_new_tokens, runner.stop_ids, Sampling())
            answers = [runner.answer_of(runner.decode(f)) for f in finals]
            texts = [f"{t} {program.reasoning.answer_prompt} {runner.decode(f)}" for t, f in zip(texts, finals)]
    return [runner._voted([texts[j * len(rows) + i] for j in range(n)], _fixed(texts, answers))
            for i in range(len(rows))]


def _fixed(texts: list[str], answers: list[str | None]):
    """answer_of for texts whose answers are already known (so the vote sees exactly those)."""
    known = dict(zip(texts, answers))
    return lambda text: known.get(text)


def after(text: str, marker: str) -> str:
    at = text.lower().rfind(marker.lower())
    return text[at + len(marker):] if at >= 0 else text


def subquestions(text: str, limit: int) -> list[str]:
    lines = [line.strip(" -*0123456789.)").strip() for line in text.splitlines()]
    return [line for line in lines if line.endswith("?")][:limit]


def least_to_most(runner: ProgramRunner, questions: list[str], rows: list[list[int]]) -> list[Prediction]:
    program, tokenizer = runner.program, runner.tokenizer
    reasoning = program.reasoning
    # Stage 1, decomposition: the question under the decomposition instruction, no demonstrations.
    decompose = render(program, tokenizer, [], instruction=reasoning.decompose_prompt)
    decomposer = PrefixLM(runner.model, head_ids(program, tokenizer, decompose.head), runner.pad_id)
    plans = decomposer.generate([text_ids(tokenizer, q + decompose.tail) for q in questions],
                                reasoning.max_reasoning_tokens, runner.stop_ids)
    steps = [subquestions(runner.decode(p), reasoning.max_subquestions - 1) + [q] for p, q in zip(plans, questions)]
    # Stage 2: sub-questions in order, each answer appended to the context of the next.
    solved: list[list[tuple[str, str]]] = [[] for _ in questions]
    for depth in range(max(len(s) for s in steps)):
        active = [i for i, s in enumerate(steps) if depth < len(s)]
        contexts = [context(questions[i], solved[i], steps[i][depth]) for i in active]
        outs = runner.lm.generate([runner.query_row(c) for c in contexts], reasoning.max_reasoning_tokens,
                                  runner.stop_ids)
        for i, out in zip(active, outs):
            solved[i].append((steps[i][depth], runner.decode(out).strip()))
    predictions = []
    for i in range(len(questions)):
        final = solved[i][-1][1]
        transcript = "\n".join(f"Q: {q}\nA: {a}" for q, a in solved[i])
        prediction = runner._voted([final], runner.answer_of)
        prediction.text = transcript
        predictions.append(prediction)
    del rows  # least-to-most builds its own prompts per step
    return predictions


def context(question: str, solved: list[tuple[str, str]], ask: str) -> str:
    if not solved and ask == question:
        return question
    lines = [question, ""] + [f"Q: {q}\nA: {a}" for q, a in solved] + [f"Q: {ask}"]
    return "\n".join(lines)
