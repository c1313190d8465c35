"""Answer extraction from generated text, answer comparison, and the self-consistency vote."""

from __future__ import annotations

import re
from collections import Counter

from onebase.prompt.spec import ExtractorSpec

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract(extractor: ExtractorSpec, text: str, labels: dict[str, list[str]] | None = None) -> str | None:
    """The answer in `text` by the program's extractor; None when there is none."""
    text = text.strip()
    if extractor.kind == "first-line":
        line = text.splitlines()[0].strip() if text else ""
        return line or None
    if extractor.kind == "last-number":
        numbers = NUMBER.findall(text)
        return numbers[-1].replace(",", "").rstrip(".") if numbers else None
    if extractor.kind == "regex":
        match = re.search(extractor.pattern or "", text)
        if not match:
            return None
        return (match.group(1) if match.groups() else match.group(0)).strip()
    return match_label(text, labels or {})


def match_label(text: str, labels: dict[str, list[str]]) -> str | None:
    """The label whose verbalizer the text starts with; else the one named first anywhere in it."""
    lowered = text.strip().lower()
    for label, words in labels.items():
        if any(lowered.startswith(w.strip().lower()) for w in words):
            return label
    found = [(lowered.find(w.strip().lower()), label) for label, words in labels.items() for w in words
             if w.strip().lower() in lowered]
    return min(found)[1] if found else None


def normalise(answer: str | None) -> str | None:
    """For exact match: case, surrounding space and a final period do not count; numbers compare by value."""
    if answer is None:
        return None
    answer = answer.strip().strip(".").strip().lower()
    try:
        number = float(answer.replace(",", ""))
        return str(int(number)) if number.is_integer() else str(number)
    except ValueError:
        return answer


def vote(answers: list[str | None]) -> str | None:
    """Self-consistency: the most frequent answer among the sampled paths (unextractable ones abstain).

    Answers are compared after `normalise`; ties go to the answer reached first.
    """
    counted = Counter(normalise(a) for a in answers if a is not None)
    if not counted:
        return None
    best = max(counted.values())
    return next(normalise(a) for a in answers if a is not None and counted[normalise(a)] == best)
