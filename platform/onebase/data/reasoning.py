"""Generated reasoning datasets: offline and deterministic, sized and seeded in the source string.

    bundled:last-letter?n=500&seed=0&words=2    "Take the last letters of the words in "Ann Bob" and concatenate them."
    bundled:arithmetic?n=500&seed=0&steps=2     multi-step word problems with a whole-number answer
    bundled:coin-flip?n=500&seed=0&people=2     "A coin is heads up. ... Is the coin still heads up?" yes/no

The symbolic tasks of Wei et al. 2022 (last-letter concatenation, coin flip) and of the
least-to-most paper (last letters). Each row carries a `rationale` (a worked solution, for
few-shot chain-of-thought demonstrations). Causal-LM rows are {input, response, rationale};
coin flip also serves sequence classification as {text, label: yes|no, rationale}.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from onebase.errors import DataError

# Words for last-letter concatenation: common first names, as in the papers.
NAMES = (
    "Aaron Abby Adam Alan Albert Alice Amber Amy Andrea Andrew Angela Anna Anthony Ashley Barbara Ben Beth "
    "Bill Bobby Brandon Brenda Brian Bruce Carl Carmen Carol Carlos Catherine Chad Charles Chris Cindy Claire "
    "Colin Craig Dale Dana Daniel Darren David Dean Debra Dennis Diana Diego Donna Doris Douglas Dylan Edgar "
    "Elena Elijah Ellen Emily Emma Eric Erin Ethan Eva Evelyn Frank Gary Gavin George Gina Glenn Grace Greg "
    "Hannah Harold Harry Heather Helen Henry Holly Ian Irene Isaac Ivan Jack Jacob James Jane Jason Jeff Jenny "
    "Jesse Jill Joan Joel John Jorge Joseph Joyce Juan Julia Julie Justin Karen Kate Keith Kelly Kevin Kim "
    "Kyle Laura Lauren Leo Leslie Linda Lisa Logan Lucas Lucy Luis Luke Maria Mark Martha Mary Mason Megan "
    "Melissa Mia Michael Miguel Mike Molly Nancy Nathan Neil Nicole Noah Nora Oliver Olivia Oscar Pablo "
    "Pamela Paul Peter Philip Rachel Ralph Ray Rebecca Richard Rita Robert Robin Rosa Ruby Ruth Ryan Sam "
    "Sandra Sara Scott Sean Sharon Simon Sofia Sophie Stella Steve Susan Tanya Teresa Terry Tina Todd Tom "
    "Tony Tracy Troy Tyler Vera Victor Vincent Walter Wayne Wendy William Xavier Yvonne Zach Zoe"
).split()

ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "stamps", "cards", "shells", "coins")


def parse_source(source: str) -> tuple[str, dict[str, int]]:
    """'bundled:name?a=1&b=2' -> ('name', {'a': 1, 'b': 2}); every value a positive whole number."""
    name, _, query = source.removeprefix("bundled:").partition("?")
    params: dict[str, int] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        try:
            params[key] = int(value)
        except ValueError:
            raise DataError(f"data.source: {source}: {key}={value!r} is not a whole number") from None
    return name, params


def last_letter(rng: random.Random, words: int) -> dict[str, Any]:
    names = rng.sample(NAMES, words)
    answer = "".join(n[-1] for n in names)
    steps = [f'The last letter of "{n}" is "{n[-1]}".' for n in names]
    concat = f'Concatenating them is "{answer}".'
    return {"input": f'Take the last letters of the words in "{" ".join(names)}" and concatenate them.',
            "response": answer, "rationale": " ".join(steps + [concat])}


def arithmetic(rng: random.Random, steps: int) -> dict[str, Any]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, 20)
    story, work = [f"{name} has {total} {item}."], []
    for _ in range(steps):
        kind = rng.choice(("buy", "give", "packs"))
        if kind == "give" and total < 2:
            kind = "buy"
        if kind == "buy":
            more = rng.randint(1, 15)
            story.append(f"Then {name} buys {more} more {item}.")
            work.append(f"{total} + {more} = {total + more}.")
            total += more
        elif kind == "give":
            less = rng.randint(1, total - 1)
            story.append(f"Then {name} gives away {less} {item}.")
            work.append(f"{total} - {less} = {total - less}.")
            total -= less
        else:
            packs, per = rng.randint(2, 5), rng.randint(2, 6)
            story.append(f"Then {name} gets {packs} packs with {per} {item} in each.")
            work.append(f"{packs} * {per} = {packs * per}, and {total} + {packs * per} = {total + packs * per}.")
            total += packs * per
    story.append(f"How many {item} does {name} have now?")
    return {"input": " ".join(story), "response": str(total), "rationale": " ".join(work)}


def coin_flip(rng: random.Random, people: int) -> dict[str, Any]:
    names = rng.sample(NAMES, people)
    flips = [rng.random() < 0.5 for _ in names]
    story = ["A coin is heads up."] + [f"{n} {'flips' if f else 'does not flip'} the coin."
                                       for n, f in zip(names, flips)]
    count = sum(flips)
    answer = "yes" if count % 2 == 0 else "no"
    parity = "even" if count % 2 == 0 else "odd"
    rationale = (f"The coin was flipped {count} time{'s' if count != 1 else ''}, an {parity} number, "
                 f"so it is {'still heads' if answer == 'yes' else 'tails'} up.")
    return {"input": " ".join(story + ["Is the coin still heads up?"]), "response": answer, "rationale": rationale}


# name -> (row maker, its size parameter and default, tasks it serves)
GENERATORS: dict[str, tuple[Callable[[random.Random, int], dict[str, Any]], str, int]] = {
    "last-letter": (last_letter, "words", 2),
    "arithmetic": (arithmetic, "steps", 2),
    "coin-flip": (coin_flip, "people", 2),
}


def generated_rows(source: str, task: str) -> list[dict[str, Any]]:
    name, params = parse_source(source)
    make, knob, default = GENERATORS[name]
    unknown = sorted(set(params) - {"n", "seed", knob})
    if unknown:
        raise DataError(f"data.source: {source}: unknown parameter {unknown[0]!r} (n, seed, {knob})")
    n, seed, size = params.get("n", 500), params.get("seed", 0), params.get(knob, default)
    if not 1 <= n <= 100_000 or not 1 <= size <= 12:
        raise DataError(f"data.source: {source}: n must be 1..100000 and {knob} 1..12")
    if name == "coin-flip" and size > len(NAMES):
        raise DataError(f"data.source: {source}: too many people")
    rng = random.Random(f"{name}:{seed}:{size}")
    rows = [make(rng, size) for _ in range(n)]
    if task == "causal-lm":
        return rows
    if task == "sequence-classification" and name == "coin-flip":
        return [{"text": r["input"], "label": r["response"], "rationale": r["rationale"]} for r in rows]
    raise DataError(f"data.source: bundled:{name} serves causal-lm"
                    + (" or sequence-classification" if name == "coin-flip" else "") + f", not {task}")
