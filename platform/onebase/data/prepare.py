"""Turn rows into token features per task, and pad them into batches."""

from __future__ import annotations

from typing import Any

import torch

from onebase.errors import DataError
from onebase.spec.schema import JobSpec, PromptSpec

ALPACA = ("Below is an instruction that describes a task{has_input}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
IGNORE = -100


def tokenize(spec: JobSpec, tokenizer, rows: list[dict[str, Any]], labels: list[str] | None) -> list[dict]:
    """One feature dict per row; `index` lets distributed eval put gathered predictions back in order."""
    fn = {"sequence-classification": _seq_cls, "token-classification": _token_cls,
          "extractive-qa": _qa, "causal-lm": _causal}[spec.task]
    features = fn(spec, tokenizer, rows, labels)
    for i, feature in enumerate(features):
        feature["index"] = i
    return features


def _seq_cls(spec, tokenizer, rows, labels):
    label_id = {label: i for i, label in enumerate(labels)}
    pairs = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None
    enc = tokenizer([r["text"] for r in rows], pairs, truncation=True, max_length=spec.data.max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": label_id[r["label"]]}
            for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], rows)]


def _token_cls(spec, tokenizer, rows, labels):
    tag_id = {tag: i for i, tag in enumerate(labels)}
    enc = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, truncation=True,
                    max_length=spec.data.max_length)
    features = []
    for i, row in enumerate(rows):
        previous, tags = None, []
        for word in enc.word_ids(i):
            # Only the first sub-token of each word carries the word's tag.
            tags.append(IGNORE if word is None or word == previous else tag_id[row["tags"][word]])
            previous = word
        features.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                         "labels": tags})
    return features


def _qa(spec, tokenizer, rows, labels):
    enc = tokenizer([r["question"] for r in rows], [r["context"] for r in rows], truncation="only_second",
                    max_length=spec.data.max_length, return_offsets_mapping=True)
    features = []
    for i, row in enumerate(rows):
        start_char, end_char = row["answer_start"], row["answer_start"] + len(row["answer"])
        start = end = 0  # [CLS]: the answer was truncated away
        sequence_ids = enc.sequence_ids(i)
        for t, (offset, seq) in enumerate(zip(enc["offset_mapping"][i], sequence_ids)):
            if seq != 1:
                continue
            if offset[0] <= start_char < offset[1]:
                start = t
            if offset[0] < end_char <= offset[1]:
                end = t
        if end < start:
            start = end = 0
        features.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                         "start_positions": start, "end_positions": end})
    return features


def render_prompt(prompt: PromptSpec, tokenizer, instruction: str, text: str) -> str:
    """The prompt text up to where the response starts."""
    if prompt.template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("prompt.template: chat needs a tokenizer with a chat template; use alpaca")
        user = "\n\n".join(part for part in (instruction, text) if part)
        messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + \
            [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if prompt.template == "alpaca":
        return ALPACA.format(has_input=", paired with an input" if text else "", instruction=instruction,
                             input_block=f"### Input:\n{text}\n\n" if text else "")
    return prompt.template.format(instruction=instruction, input=text)


def prompt_ids(spec: JobSpec, tokenizer, row: dict[str, Any]) -> list[int]:
    instruction = row.get("instruction") or spec.prompt.instruction or ""
    prompt = spec.prompt
    if row.get("template"):  # a mixture source's own template (data/mixture.py)
        prompt = prompt.model_copy(update={"template": row["template"]})
    text = render_prompt(prompt, tokenizer, instruction, row.get("input") or "")
    # A chat template already writes the BOS token; other templates get the tokenizer's specials.
    return tokenizer(text, add_special_tokens=prompt.template != "chat")["input_ids"]


def _causal(spec, tokenizer, rows, labels):
    features, limit = [], spec.data.max_length
    for row in rows:
        prompt = prompt_ids(spec, tokenizer, row)
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        response = response[: limit - 1]
        prompt = prompt[-(limit - len(response)):]  # keep the end of the prompt, next to the response
        features.append({"input_ids": prompt + response, "attention_mask": [1] * (len(prompt) + len(response)),
                         "labels": [IGNORE] * len(prompt) + response})
    return features


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels that are sequences pad with -100 so the loss skips them."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            fill = {"input_ids": pad_id, "attention_mask": 0}.get(key, IGNORE)
            values = [v + [fill] * (width - len(v)) for v in values]
        batch[key] = torch.tensor(values)
    return batch
