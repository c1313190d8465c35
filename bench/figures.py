"""What every training benchmark starts its JSON with, and where it writes it (bench/results/<name>.json)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def header() -> dict:
    """The machine and how busy it was: these benchmarks ran on a shared machine."""
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": [round(x, 1) for x in os.getloadavg()]}


def save(name: str, out: dict) -> Path:
    """Print the figures and write them to bench/results/<name>.json."""
    print(json.dumps(out, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"{name}.json"
    target.write_text(json.dumps(out, indent=2))
    return target
