"""A program on a tuned base: `adapter:` names an onebase training export trained on the program's base.

The export is read as training wrote it (`onebase.json` + the method's files). A PEFT adapter of the
LoRA family is merged into the frozen base (plain weights again, so the runner's prefix cache and
batched forwards work unchanged); onebase's own adapters (bitfit, houlsby, adapterbias) load on it as
their method does; a full fine-tune is loaded as the model itself. Soft prompts and prefixes cannot be
merged into weights and are refused: the runner feeds its own cached prefix.

The checks run in two places: `check_export` before Ray (the export reads, is a causal LM, names this
program's base), `check_base_fingerprint` once a worker has loaded the base (the same backbone bytes).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from onebase.errors import OnebaseError, SpecError
from onebase.manifest import MANIFEST, RunInfo, read_run_info

# PEFT methods whose trained tensors merge into the base weights; the others run beside them.
MERGED = frozenset({"lora", "dora", "ia3"})
LOADED = frozenset({"full", "bitfit", "houlsby", "adapterbias"})


class AdapterRef(BaseModel):
    """What a program records about the export it runs on (manifest, registry tags)."""

    model_config = ConfigDict(extra="forbid")

    path: str
    method: str
    base_model: str
    base_fingerprint: str | None = None
    export_sha256: str | None = None


def read_export(path: str) -> RunInfo:
    """The export's manifest (manifest.read_run_info), or a one-line error naming what is missing."""
    directory = Path(path)
    if not directory.is_dir():
        raise SpecError(f"adapter: {path} is not a directory (an onebase training export)")
    if not (directory / MANIFEST).is_file():
        raise SpecError(f"adapter: {path} has no readable {MANIFEST} (not an onebase training export)")
    try:
        return read_run_info(directory, SpecError)
    except SpecError as err:
        raise SpecError(f"adapter: {err}") from None


def check_export(path: str, base: str) -> RunInfo:
    """Before Ray: the export is a causal-LM tune of a method a program can run on, trained on `base`."""
    info = read_export(path)
    method, task = info["method"], info.get("task")
    if task != "causal-lm":
        raise SpecError(f"adapter: {path} is a {task} export; a program needs a causal-lm tune of its base")
    if method not in MERGED | LOADED:
        raise SpecError(f"adapter: method {method} cannot run under a program (it feeds its own prefix); "
                        f"use one of {', '.join(sorted(MERGED | LOADED))}")
    trained_on = str(info.get("base_model"))
    if not same_model(trained_on, base):
        raise SpecError(f"adapter: {path} was trained on base {trained_on}, not on this program's base {base}")
    return info


def same_model(a: str, b: str) -> bool:
    """The same name, or two names (bundled name, path) for one local model directory."""
    from onebase.model.assets import resolve_model

    if a == b:
        return True
    try:
        return resolve_model(a) == resolve_model(b)
    except OnebaseError:  # the export's base does not resolve here: it cannot be this program's
        return False


def check_base_fingerprint(path: str, fingerprint: str) -> None:
    """After loading: the base the workers hold is the very backbone the export was trained on."""
    expected = read_export(path).get("base_fingerprint")
    if expected and expected != fingerprint:
        raise OnebaseError(f"adapter: {path} was trained on a base with fingerprint {expected[:12]}..., the "
                           f"program's base has {fingerprint[:12]}... (same name, different weights)")


def reference(path: str) -> AdapterRef:
    from onebase.tracking.mlflow_run import sha256_dir

    info = read_export(path)
    return AdapterRef(path=path, method=info["method"], base_model=str(info.get("base_model")),
                      base_fingerprint=info.get("base_fingerprint"), export_sha256=sha256_dir(Path(path)))


def apply_adapter(base, path: str):
    """The model a program runs on: `base` (a fresh causal LM, consumed) with the export applied."""
    from onebase.methods import load_trained

    method = read_export(path)["method"]
    model = load_trained(base, Path(path))
    if method in MERGED:
        model = model.merge_and_unload()  # plain weights: PEFT's wrappers would bypass nothing but cost time
    return model
