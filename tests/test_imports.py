"""The package's import structure: every module imports on its own, and the subpackages form layers.

An import inside a function is still a dependency: `spec` importing `methods` late, while `methods`
imports `spec` at the top, is a cycle that only shows as an import-order bug later. So the layer
check reads every `import onebase...` in the source, at module level or not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "onebase"


def modules() -> dict[str, Path]:
    """Every module of onebase by dotted name (a package by its own name, not `.__init__`)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, module_level_only: bool) -> list[tuple[str, int]]:
    """(imported onebase module, line) for each import in `path`; `from onebase.x import y` names
    module `onebase.x.y` when y is a module, else `onebase.x`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else ast.walk(tree)
    known = modules()
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "onebase"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "onebase":
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.append((target if target in known else node.module, node.lineno))
    return found


def layer(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to: onebase.train.loop -> train."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def find_cycle(edges: dict[str, dict[str, str]]) -> list[str] | None:
    """A cycle in the graph as [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(edges.get(node, {})):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        done.add(node)
        return None

    for start in sorted(edges):
        if start not in done:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def graph(level, module_level_only: bool) -> dict[str, dict[str, str]]:
    """level(module) -> {level(imported): 'file:line' of one such import}, self-edges left out."""
    edges: dict[str, dict[str, str]] = defaultdict(dict)
    for name, path in modules().items():
        for target, line in imports(path, module_level_only):
            if level(target) != level(name):
                edges[level(name)].setdefault(level(target), f"{path.relative_to(PACKAGE.parent)}:{line}")
    return edges


def explain(cycle: list[str], edges: dict[str, dict[str, str]]) -> str:
    return " -> ".join(cycle) + "\n" + "\n".join(f"  {a} -> {b}: {edges[a][b]}" for a, b in zip(cycle, cycle[1:]))


def test_the_subpackages_import_each_other_without_a_cycle_even_through_function_level_imports():
    edges = graph(layer, module_level_only=False)
    cycle = find_cycle(edges)
    assert cycle is None, "package-level import cycle: " + explain(cycle, edges)
    # The contracts the layering rests on, stated directly.
    assert "methods" not in edges["spec"], f"spec imports methods ({edges['spec'].get('methods')})"
    assert "cluster" not in edges["train"], f"train imports cluster ({edges['train'].get('cluster')})"
    assert not {"train", "sweep", "cluster", "serve"} & set(edges["runtime"]), edges["runtime"]


def test_no_module_imports_one_that_imports_it_back_at_module_level():
    edges = graph(lambda name: name, module_level_only=True)
    cycle = find_cycle(edges)
    assert cycle is None, "module-level import cycle: " + explain(cycle, edges)


def test_the_cycle_finder_finds_a_cycle():
    # The two tests above pass on an empty answer; this one shows the finder can say "cycle".
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}}) is None


# Forked from one interpreter that has loaded the third-party libraries but nothing of onebase, each
# child imports one onebase module on its own: an import that only works after another onebase
# module was loaded first fails here. (A fresh `python -c` per module costs ~5 s each: ~8 min.)
ISOLATED = textwrap.dedent("""
    import importlib, os, sys, traceback
    for lib in ("torch", "transformers", "pydantic", "yaml", "ray", "ray.tune", "ray.train", "ray.serve",
                "fastapi", "mlflow", "peft", "safetensors"):
        importlib.import_module(lib)
    assert not [m for m in sys.modules if m == "onebase" or m.startswith("onebase.")]
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(name)
    print("FAILED:", " ".join(failed))
    sys.exit(1 if failed else 0)
""")


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    names = sorted(modules())
    assert {"onebase.runtime", "onebase.tasks", "onebase.spec.schema", "onebase.methods", "onebase.serve.app"} <= set(
        names)
    done = subprocess.run([sys.executable, "-c", ISOLATED, *names], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    assert done.stdout.strip() == "FAILED:"


def test_job_and_sweep_specs_validate_without_the_methods_torch_or_peft():
    # spec -> methods is one-way: checking a spec (`onebase validate`, `submit`) needs only the schemas.
    code = ("import sys; from onebase.spec import load_spec; from onebase.sweep.spec import load_sweep; "
            "load_spec('jobs/tweet-sentiment-lora.yaml'); load_sweep('jobs/sweep-adapters.yaml'); "
            "print(sorted(m for m in ('onebase.methods', 'torch', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
