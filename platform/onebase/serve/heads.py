"""What the non-generating task heads answer, one batched forward per group of rows.

- sequence-classification: a label and the probability of every label, per text
- token-classification: per word (whitespace-split), its label and score (the first sub-token's
  prediction, the token training labels), with character offsets in the text
- extractive-qa: the best span of the context for the question (start <= end, at most
  MAX_ANSWER_TOKENS long, inside the context), its score (start x end probability) and offsets
"""

from __future__ import annotations

import re
from typing import Any

import torch

MAX_ANSWER_TOKENS = 30


def _call(runner, rows, enc) -> Any:
    kwargs = {"adapter_names": [row.adapter.key for row in rows]} if runner.mixed else {}
    return runner.model(**{k: v for k, v in enc.items() if k != "offset_mapping"}, **kwargs)


def _labels(runner, row, count: int) -> list[str]:
    return row.adapter.info.labels or runner.labels or [f"LABEL_{j}" for j in range(count)]


def sequence_labels(tokenizer, runner, rows, max_length: int) -> list[dict[str, Any]]:
    enc = tokenizer([row.text for row in rows], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    probs = _call(runner, rows, enc).logits.float().softmax(-1)
    results = []
    for row, row_probs in zip(rows, probs):
        labels = _labels(runner, row, len(row_probs))
        results.append({"label": labels[int(row_probs.argmax())],
                        "probabilities": {label: round(float(p), 6) for label, p in zip(labels, row_probs)}})
    return results


def token_labels(tokenizer, runner, rows, max_length: int) -> list[dict[str, Any]]:
    spans = [[(m.start(), m.end()) for m in re.finditer(r"\S+", row.text)] for row in rows]
    words = [[row.text[a:b] for a, b in s] for row, s in zip(rows, spans)]
    enc = tokenizer(words, is_split_into_words=True, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    probs = _call(runner, rows, enc).logits.float().softmax(-1)
    results = []
    for k, row in enumerate(rows):
        labels = _labels(runner, row, probs.shape[-1])
        tokens, seen = [], set()
        for position, word in enumerate(enc.word_ids(k)):
            if word is None or word in seen:
                continue  # only a word's first sub-token carries its label (as in training)
            seen.add(word)
            p = probs[k, position]
            best = int(p.argmax())
            start, end = spans[k][word]
            tokens.append({"token": words[k][word], "label": labels[best], "score": round(float(p[best]), 6),
                           "start": start, "end": end})
        results.append({"tokens": tokens})  # words past max_length are not labelled
    return results


def answer_spans(tokenizer, runner, rows, max_length: int) -> list[dict[str, Any]]:
    enc = tokenizer([row.text for row in rows], [row.context for row in rows], padding=True,
                    truncation="only_second", max_length=max_length, return_offsets_mapping=True,
                    return_tensors="pt")
    out = _call(runner, rows, enc)
    starts, ends = out.start_logits.float().softmax(-1), out.end_logits.float().softmax(-1)
    results = []
    for k, row in enumerate(rows):
        context = torch.tensor([s == 1 for s in enc.sequence_ids(k)])
        s_p = torch.where(context, starts[k], torch.zeros_like(starts[k]))
        e_p = torch.where(context, ends[k], torch.zeros_like(ends[k]))
        # score[i, j] = P(start=i) P(end=j) for i <= j < i + MAX_ANSWER_TOKENS
        scores = torch.triu(s_p[:, None] * e_p[None, :]).tril(MAX_ANSWER_TOKENS - 1)
        best = int(scores.argmax())
        i, j = divmod(best, scores.shape[1])
        offsets = enc["offset_mapping"][k]
        start, end = int(offsets[i][0]), int(offsets[j][1])
        results.append({"answer": row.context[start:end], "score": round(float(scores[i, j]), 6),
                        "start": start, "end": end})
    return results


HEADS = {"sequence-classification": sequence_labels, "token-classification": token_labels,
         "extractive-qa": answer_spans}
