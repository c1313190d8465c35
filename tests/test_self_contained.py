"""The repository is self-contained: no tracked file reaches outside the clone.

A user clones the repository alone. A test, script or doc that reads `../something` (or climbs
above the repository root with `Path(__file__).parents[N]` / `REPO.parent`) works only on the
machines it was written on and fails everywhere else.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
# `../x` in any text; resolved against the file's folder and the repository root.
CLIMB = re.compile(r"(?:\.\./)+[\w.-]*")
# Python path arithmetic: parents[N] of this file, or the parent of a repository-root constant.
PARENTS = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")
ROOT_PARENT = re.compile(r"\b(?:REPO|ROOT|REPO_ROOT|REPOSITORY)\.parent\b")
# The folder beside the repository on the machines this project is built on.
SIBLING = re.compile(r"\bshared/(?:kuberay-crds|seeds|notes|hooks)\b")


def tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def escapes(relative: str, base: PurePosixPath) -> bool:
    """True when `relative`, taken from `base` (a folder inside the repository), leaves the repository."""
    depth = len(base.parts)
    for part in PurePosixPath(relative).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def outside_references(name: str, text: str) -> list[str]:
    folder = PurePosixPath(name).parent
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for match in CLIMB.finditer(line):
            # Outside only if it escapes both from the file's own folder and from the repository root
            # (a path in a test input like "../escape" is data, and stays inside from either).
            if escapes(match.group(), folder) and escapes(match.group(), PurePosixPath()):
                found.append(f"{name}:{lineno}: {match.group()}")
        for match in PARENTS.finditer(line):
            if int(match.group(1)) >= len(folder.parts) + 1:
                found.append(f"{name}:{lineno}: {match.group()} is above the repository root")
        found += [f"{name}:{lineno}: {m.group()}" for m in ROOT_PARENT.finditer(line)]
        found += [f"{name}:{lineno}: {m.group()} (a folder beside the repository)" for m in SIBLING.finditer(line)]
    return found


def test_no_tracked_file_refers_to_a_path_outside_the_repository():
    problems = []
    for name in tracked_text_files():
        if name == "tests/test_self_contained.py":
            continue  # its patterns describe what it looks for
        data = (REPO / name).read_bytes() if (REPO / name).is_file() else b""
        if b"\0" in data:
            continue  # binary
        problems += outside_references(name, data.decode("utf-8", errors="replace"))
    assert not problems, "tracked files refer to paths outside the repository:\n" + "\n".join(problems)


def test_the_check_catches_each_way_out():
    assert outside_references("tests/test_x.py", 'CRDS = REPO.parent / "shared" / "kuberay-crds"')
    assert outside_references("tests/test_x.py", 'p = Path(__file__).resolve().parents[2] / "data"')
    assert outside_references("infra/x.sh", "cp ../../shared/notes/a.md .")
    assert outside_references("README.md", "see ../shared/seeds/ for the notes")
    assert not outside_references("tests/test_x.py", 'ROOT = Path(__file__).resolve().parents[1]')
    assert not outside_references("tests/test_x.py", '({"name": "../escape"}, "name: use letters")')
    assert not outside_references("infra/x.sh", 'cd "$(dirname "$0")/.."')
