"""One Ray actor per evaluation worker: the base loaded once, programs run on it in batches."""

from __future__ import annotations

import time
from typing import Any

from onebase.prompt.spec import ProgramSpec


def load_base(spec: ProgramSpec, model_path: str):
    """(model, tokenizer) the program runs on, frozen: its base, with `spec.adapter` applied when set."""
    model, tokenizer = load_bare_base(spec, model_path)
    return on_adapter(spec, model), tokenizer


def load_bare_base(spec: ProgramSpec, model_path: str):
    """(model, tokenizer) of the program's base, frozen; random init is seeded, so every worker agrees."""
    import torch

    from onebase.model.build import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    # The bare causal LM whatever the program's task: classification scores the LM's own tokens.
    job = spec.job_spec().model_copy(update={"task": "causal-lm"})
    model = load_model(job, model_path, None, tokenizer.pad_token_id)
    return model.eval().requires_grad_(False).to(torch.float32), tokenizer


def on_adapter(spec: ProgramSpec, base):
    """The base with the program's training export applied (merged when the method allows), frozen."""
    if not spec.adapter:
        return base
    import torch

    from onebase.prompt.adapter import apply_adapter

    return apply_adapter(base, spec.adapter).eval().requires_grad_(False).to(torch.float32)


class ProgramWorker:
    """Ray actor body (wrapped with ray.remote by the driver)."""

    def __init__(self, spec_json: dict[str, Any], model_path: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.spec = ProgramSpec.model_validate(spec_json)
        from onebase.model.build import base_fingerprint

        self.model, self.tokenizer = load_bare_base(self.spec, model_path)
        # The frozen base's fingerprint, taken before an adapter changes its weights: what the program
        # records and what serving compares against its base.
        self.base_sha256 = base_fingerprint(self.model)
        self.model = on_adapter(self.spec, self.model)
        self.runners: dict[str, Any] = {}

    def fingerprint(self) -> str:
        return self.base_sha256

    def _runner(self, program_json: dict[str, Any]):
        from onebase.prompt.program import Program
        from onebase.prompt.runner import ProgramRunner

        key = str(sorted(program_json.items()))
        if key not in self.runners:  # one runner per program: its prefix cache is computed once
            self.runners = {key: ProgramRunner(self.model, self.tokenizer, Program.model_validate(program_json),
                                               batch_size=self.spec.batch_size)}
        return self.runners[key]

    def content_free(self, program_json: dict[str, Any]) -> list[float]:
        return self._runner(program_json).content_free_probs()

    def predict(self, program_json: dict[str, Any], texts: list[str]) -> dict[str, Any]:
        runner = self._runner(program_json)
        started = time.perf_counter()
        predictions = runner.predict(texts)
        seconds = time.perf_counter() - started
        return {"predictions": [vars(p) for p in predictions], "seconds": seconds}

    def propose(self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        """APE: free generations of raw prompts (no program), sampled."""
        from onebase.prompt.lm import PrefixLM, Sampling
        from onebase.prompt.render import text_ids

        lm = PrefixLM(self.model, [], self.tokenizer.pad_token_id)
        rows = [text_ids(self.tokenizer, p) for p in prompts]
        stop = {self.tokenizer.eos_token_id}
        outs = lm.generate(rows, max_new_tokens, stop, Sampling(temperature, 0.95, seed))
        return [self.tokenizer.decode(o, skip_special_tokens=True) for o in outs]
