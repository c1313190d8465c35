"""Which evaluation rows a contender was scored on: an id per row (a hash of its query and gold
answer) and one hash of the ordered ids, recorded per contender and compared in the report."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def row_ids(pairs: list[tuple[str, str]]) -> list[str]:
    return [hashlib.sha256(json.dumps([q, g], ensure_ascii=False).encode()).hexdigest()[:16] for q, g in pairs]


def ids_of_dataset_rows(rows: list[dict[str, Any]], classification: bool) -> list[str]:
    from onebase.prompt.demos import row_query

    return row_ids([row_query(r, classification) for r in rows])


def digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()
