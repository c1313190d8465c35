"""Prompt programs: the frozen base prompted instead of tuned, as versioned, served artifacts.

    from onebase.prompt import Program, ProgramRunner, load_program, save_program

Names load on first use, so importing the spec (bad input, `onebase --help`) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "is_program_dir": "onebase.prompt.artifact", "load_program": "onebase.prompt.artifact",
    "read_manifest": "onebase.prompt.artifact", "save_program": "onebase.prompt.artifact",
    "METHOD": "onebase.prompt.program", "Demo": "onebase.prompt.program", "Program": "onebase.prompt.program",
    "Prediction": "onebase.prompt.runner", "ProgramRunner": "onebase.prompt.runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'onebase.prompt' has no attribute {name!r}")
