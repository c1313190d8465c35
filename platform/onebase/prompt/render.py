"""Render a program into token ids: a head shared by every query, then the query and the tail.

The prompt for query q is `head + q + tail`, split where the query goes: with fixed demos the head
(instruction and demonstrations) is the same for every query, which is what the prefix cache keeps.
Head and `q + tail` are tokenised separately, cached or not, so both paths see the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from onebase.prompt.program import Demo, Program

SENTINEL = "\u2063ONEBASE-QUERY\u2063"


@dataclass(frozen=True)
class Rendered:
    head: str
    tail: str

    def text(self, query: str) -> str:
        return self.head + query + self.tail


def demo_answer(program: Program, demo: Demo) -> str:
    """What a demonstration answers: the first verbalizer of its label, after its rationale in CoT."""
    answer = demo.answer
    if program.is_classification and program.labels and demo.answer in program.labels:
        answer = program.labels[demo.answer][0]
    if program.reasoning.mode == "cot" and demo.rationale:
        return f"{demo.rationale} {program.reasoning.answer_prompt} {answer}."
    return answer


def answer_lead(program: Program) -> str:
    """Text between a prompt and its answer: a chat turn starts the answer; a custom template has ' '."""
    return "" if program.template == "chat" else " "


def render(program: Program, tokenizer, demos: list[Demo], instruction: str | None = None) -> Rendered:
    """The prompt around the query slot, with `demos` before it (`instruction` overrides the program's)."""
    instruction = program.instruction if instruction is None else instruction
    if program.template == "chat":
        text = _chat(program, tokenizer, demos, instruction)
    else:
        text = _custom(program, demos, instruction)
    head, _, tail = text.partition(SENTINEL)
    return Rendered(head, tail)


def _chat(program: Program, tokenizer, demos: list[Demo], instruction: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template: chat needs a tokenizer with a chat template; give a custom template")
    messages = [{"role": "system", "content": program.system}] if program.system else []
    lead = f"{instruction}\n\n" if instruction else ""
    for demo in demos:  # one user/assistant turn per demonstration; the instruction opens the first
        messages += [{"role": "user", "content": lead + demo.input},
                     {"role": "assistant", "content": demo_answer(program, demo)}]
        lead = ""
    messages.append({"role": "user", "content": lead + SENTINEL})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _custom(program: Program, demos: list[Demo], instruction: str) -> str:
    template = program.template
    header = f"{instruction}\n\n" if instruction and "{instruction}" not in template else ""
    blocks = [template.format(instruction=instruction, input=d.input) + " " + demo_answer(program, d)
              for d in demos]
    query = template.format(instruction=instruction, input=SENTINEL)
    return header + "".join(b + "\n\n" for b in blocks) + query


def head_ids(program: Program, tokenizer, head: str) -> list[int]:
    # A chat template writes its own special tokens; a custom string gets the tokenizer's (BOS).
    return tokenizer(head, add_special_tokens=program.template != "chat")["input_ids"]


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
