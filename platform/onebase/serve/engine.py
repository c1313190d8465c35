"""One frozen base in memory, any number of adapters of any method on it, chosen per request.

The base's tensors are loaded once. Every adapter runs on a *view*: a model skeleton of the
adapter's task built on the meta device whose parameters are the base's own tensor objects (no
copies), with only the adapter's tensors and its task head allocated. Adapters of the LoRA family
(LoRA, DoRA) of one task and label count share one view and run mixed in a single forward
(PEFT `adapter_names`); every other method (IA3, prefix, prompt, P-tuning, BitFit, Houlsby,
AdapterBias) gets a view of its own and runs grouped. BitFit and the layer-norm-training methods
overwrite base tensors: their view holds private copies of exactly those tensors.

Model calls are serialised by one lock: PEFT's mixed batches install forward hooks for the
duration of a call, so two concurrent calls on one model would see each other's hooks. The one
exception is the replica's prefill thread (`prefill_worker.py`): it runs only forwards that install
no hooks, and whatever changes the model waits for it (`Decoder.quiesce`).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onebase.data.prepare import render_prompt
from onebase.errors import error_line
from onebase.methods import get_method
from onebase.model.assets import resolve_model
from onebase.model.build import AUTO_CLASSES, base_fingerprint, head_modules, is_decoder_only, load_tokenizer
from onebase.serve.artifacts import AdapterError, AdapterInfo
from onebase.serve.decode import Decoder, Sampling, Sequence
from onebase.serve.gathered import GatheredLora
from onebase.serve.heads import HEADS
from onebase.serve.lora_pool import LoraPool
from onebase.serve.packed import PackedLinears, packable
from onebase.serve.virtual import VirtualTokens, virtual_tokens
from onebase.spec.schema import PromptSpec
from onebase.tasks import ROUTES


@dataclass
class Loaded:
    """An adapter resident on this engine. Leases keep it alive while requests use it."""

    id: str
    key: str  # unique internal name: a reloaded id never collides with the copy it replaces
    info: AdapterInfo
    runner: Runner
    load_ms: float
    tag: str = ""  # the serving layer's name for this copy (adapter id and revision)
    leases: int = 0
    closing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Runner:
    """A model that serves one or more adapters of one task."""

    model: nn.Module
    task: str
    labels: list[str] | None
    mixed: bool  # True: a LoRA pool, rows pick their adapter through adapter_names
    keys: set[str] = field(default_factory=set)
    lora: LoraPool | None = None
    gathered: GatheredLora | None = None  # causal-lm pools: plain LoRA rows run gathered
    virtual: VirtualTokens | None = None  # a prompt-learning causal LM's virtual tokens, computed at load


@dataclass
class Row:
    """One request's input: text to classify, or a prompt (already rendered) to continue."""

    adapter: Loaded | None  # None: the bare base
    text: str
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    context: str | None = None  # extractive QA: the text holding the answer (`text` is the question)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k
    seed: int | None = None


class BaseEngine:
    def __init__(self, model: str, task: str | None = None, threads: int | None = None,
                 dtype: str = "float32", packed_weights: bool = True) -> None:
        import transformers

        if threads:
            torch.set_num_threads(threads)
        self.name = model
        self.dtype: torch.dtype = getattr(torch, dtype)
        self.path = resolve_model(model)
        self.config = transformers.AutoConfig.from_pretrained(self.path)
        self.decoder = _is_decoder(self.config)
        self.task = task or ("causal-lm" if self.decoder else "sequence-classification")
        self.tokenizer = load_tokenizer(self.path)
        # The bare base: the causal LM (the generalist) or the backbone alone (an encoder has no
        # head of its own; its specialists bring theirs).
        auto = transformers.AutoModelForCausalLM if self.task == "causal-lm" else transformers.AutoModel
        self.base = auto.from_pretrained(self.path, dtype=torch.float32).eval().requires_grad_(False)
        # Fingerprints hash the fp32 weights training saw, so they are taken before any cast.
        self.fingerprint = base_fingerprint(self.base)
        # Token-classification and QA heads are built without the pooler: their backbone is the rest.
        self.fingerprints = {self.fingerprint, base_fingerprint(self.base, skip=("pooler.",))}
        self.base.to(self.dtype)
        # Name -> tensor as loaded, before any adapter touched a module (tied weights appear under both names).
        self.tensors: dict[str, torch.Tensor] = {
            **dict(self.base.named_parameters(remove_duplicate=False)),
            **dict(self.base.named_buffers(remove_duplicate=False)),  # non-persistent ones too (position ids)
        }
        # Linear weights packed once for the CPU's matmul kernels (`packed.py`); views use the same packs.
        self.packed = PackedLinears(self.base) if packed_weights and packable(self.dtype) else None
        self.pools: dict[tuple[str, int], Runner] = {}
        self.adapters: dict[str, Loaded] = {}
        self.lock = threading.RLock()
        self._serial = 0
        self._bare: Runner | None = None
        self.batcher = Decoder(self)  # continuous batching over every generating adapter of this base

    # ---- adapters --------------------------------------------------------------------------

    def load(self, adapter_id: str, info: AdapterInfo) -> Loaded:
        """Put an adapter on this base; refuses one trained on another base."""
        if info.task == "causal-lm" and not self.decoder:
            raise AdapterError(f"adapter {adapter_id}: a causal-lm adapter needs a decoder base, not {self.name}")
        if info.base_fingerprint and info.base_fingerprint not in self.fingerprints:
            raise AdapterError(f"adapter {adapter_id}: trained on a different base (sha256 "
                               f"{info.base_fingerprint[:12]}...), this replica serves {self.name} "
                               f"(sha256 {self.fingerprint[:12]}...)")
        started = time.perf_counter()
        with self.lock:
            self.batcher.quiesce()  # no prefill on the model while it changes
            self._serial += 1
            key = f"a{self._serial}"
            try:
                runner = self._attach(key, info)
            except AdapterError:
                raise
            except Exception as err:  # shapes that do not fit, broken configs: the adapter's fault
                raise AdapterError(f"adapter {adapter_id}: cannot load on {self.name}: "
                                   f"{_one_line(err)}") from None
            loaded = Loaded(adapter_id, key, info, runner, (time.perf_counter() - started) * 1000)
            self.adapters[key] = loaded
        return loaded

    def lease(self, loaded: Loaded) -> Loaded:
        with loaded.lock:
            if loaded.closing:
                raise AdapterError(f"adapter {loaded.id} was unloaded")
            loaded.leases += 1
        return loaded

    def release(self, loaded: Loaded) -> None:
        with loaded.lock:
            loaded.leases -= 1
            drop = loaded.closing and loaded.leases == 0
        if drop:
            self._detach(loaded)

    def unload(self, loaded: Loaded) -> None:
        """Remove an adapter once no request uses it (now, or when the last lease is released)."""
        with loaded.lock:
            if loaded.closing:
                return  # Serve may call an evicted model's __del__ twice
            loaded.closing = True
            drop = loaded.leases == 0
        if drop:
            self._detach(loaded)

    def _attach(self, key: str, info: AdapterInfo) -> Runner:
        labels = info.labels or _head_labels(info)
        if info.mixes_in_batch:
            pool_key = (info.task, len(labels or ()))
            pool = self.pools.get(pool_key)
            if pool is None:
                from peft import PeftModel

                view = self.view(info.task, labels)
                model = self._cast(PeftModel.from_pretrained(view, str(info.path), adapter_name=key).eval())
                pool = self.pools[pool_key] = Runner(model, info.task, labels, mixed=True, lora=LoraPool(model),
                                                     gathered=GatheredLora(model) if info.task == "causal-lm" else None)
            elif not pool.lora.add(key, info.path):
                pool.model.load_adapter(str(info.path), adapter_name=key, low_cpu_mem_usage=True)
                self._cast(pool.model).eval()
                fast, pool.lora = pool.lora.fast, LoraPool(pool.model)  # PEFT may have wrapped new layers
                pool.lora.fast = fast
            pool.keys.add(key)
            if pool.gathered is not None:
                pool.gathered.add(key)
            return pool
        private = _overwritten_base_tensors(info)
        view = self.view(info.task, labels, private=private)
        model = self._cast(get_method(info.method).load(view, info.path).eval())
        _require_loaded(model, info)
        virtual = virtual_tokens(model) if info.task == "causal-lm" else None
        return Runner(model, info.task, labels, mixed=False, keys={key}, virtual=virtual)

    def _cast(self, model: nn.Module) -> nn.Module:
        """An adapter's own tensors (heads, bottlenecks, prompt encoders; PEFT keeps LoRA in fp32) in the
        served dtype, so one forward runs in one dtype; the shared base tensors already are."""
        return model if self.dtype == torch.float32 else model.to(self.dtype)

    def _detach(self, loaded: Loaded) -> None:
        with self.lock:
            self.batcher.quiesce()
            self.adapters.pop(loaded.key, None)
            runner = loaded.runner
            runner.keys.discard(loaded.key)
            if runner.gathered is not None:
                runner.gathered.remove(loaded.key)
            if runner.lora is not None:
                runner.lora.remove(loaded.key)
            if not runner.mixed:
                runner.virtual = None  # its own runner: nothing decodes on it any more
            self.batcher.prefix.drop(loaded.key)

    def view(self, task: str, labels: list[str] | None, private: set[str] = frozenset()) -> nn.Module:
        """A model for `task` whose parameters are this base's tensors; the head (and `private`
        tensors) are allocated for the adapter to fill."""
        import transformers

        config = copy.deepcopy(self.config)
        if task in ("sequence-classification", "token-classification"):
            config.num_labels = len(labels or ())
            config.id2label = dict(enumerate(labels or ()))
            config.label2id = {label: i for i, label in enumerate(labels or ())}
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id  # decoder classifiers find the last token by it
        auto = getattr(transformers, AUTO_CLASSES[task])
        with torch.device("meta"):
            model = auto.from_config(config, dtype=self.dtype)
        prefix = f"{model.base_model_prefix}."
        heads = tuple(f"{name}." for name in head_modules(model))
        for module_name, module in model.named_modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(module, kind)
                for name, tensor in list(table.items()):
                    if tensor is None:
                        continue
                    full = f"{module_name}.{name}" if module_name else name
                    shared = None if full.startswith(heads) else (
                        self.tensors.get(full) if full in self.tensors else self.tensors.get(full.removeprefix(prefix)))
                    if shared is not None and full not in private:
                        table[name] = shared
                    elif shared is not None:
                        table[name] = _like(shared.detach().clone(), kind)
                    else:
                        table[name] = _like(torch.zeros(tensor.shape, dtype=tensor.dtype), kind)
        if self.packed is not None:
            self.packed.apply(model)
        return model.eval().requires_grad_(False)

    # ---- inference -------------------------------------------------------------------------

    def classify(self, rows: list[Row], max_length: int = 512) -> list[dict[str, Any]]:
        """Label and probabilities per row; rows of one LoRA pool share a forward."""
        return self.predict(rows, "sequence-classification", max_length)

    @torch.inference_mode()
    def predict(self, rows: list[Row], task: str, max_length: int = 512) -> list[dict[str, Any]]:
        """What a non-generating head answers per row (`heads.py`); every row's adapter must be of `task`."""
        results: list[dict[str, Any] | None] = [None] * len(rows)
        with self.lock:
            for runner, indices in self._groups(rows):
                if runner.task != task:
                    name = rows[indices[0]].adapter.id if rows[indices[0]].adapter else self.name
                    raise AdapterError(f"model {name}: a {runner.task} model does not answer {task} requests"
                                       f" ({ROUTES.get(runner.task, '/v1/completions')} serves it)")
                group = [rows[i] for i in indices]
                for i, result in zip(indices, HEADS[task](self.tokenizer, runner, group, max_length)):
                    results[i] = result
        return results  # type: ignore[return-value]

    def generate(self, rows: list[Row]) -> list[dict[str, Any]]:
        """Continue each row's prompt to its end, all rows batched together (for callers that own the
        model: tests, benchmarks; the server's scheduler steps `self.batcher` itself)."""
        return self.batcher.run([self.sequence(row) for row in rows])

    def stream(self, row: Row) -> Iterator[str]:
        """Text pieces as they are generated, stepping the batcher between them (callers that own the model)."""
        pieces: list[str] = []
        seq = self.batcher.submit(self.sequence(row, on_text=lambda text, _logprobs: pieces.append(text)))
        while not seq.done.is_set():
            self.batcher.step()
            yield from pieces
            pieces.clear()
        yield from pieces

    def sequence(self, row: Row, on_text=None) -> Sequence:
        """A row as a sequence for the batcher (raises AdapterError for a row that cannot generate)."""
        runner = self._runner(row)
        # Chat templates carry their own BOS.
        specials = not row.text.startswith(self.tokenizer.bos_token or "\0")
        ids = self.tokenizer(row.text, add_special_tokens=specials)["input_ids"]
        sampling = Sampling(max_tokens=row.max_tokens, temperature=row.temperature, top_p=row.top_p,
                            stop=tuple(row.stop), logprobs=row.logprobs, seed=row.seed)
        return Sequence(row.adapter, runner, ids, sampling, on_text=on_text)

    def render_chat(self, messages: list[dict[str, str]], adapter: Loaded | None) -> str:
        """The prompt text for a chat: an adapter trained with a template gets its own template."""
        prompt = adapter.info.prompt if adapter else None
        if prompt:
            spec = PromptSpec.model_validate(prompt)
            last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            instruction = spec.instruction or ""
            return render_prompt(spec, self.tokenizer, instruction, last_user)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- helpers ---------------------------------------------------------------------------

    def _runner(self, row: Row) -> Runner:
        if row.adapter is not None:
            return row.adapter.runner
        if self.task != "causal-lm":
            raise AdapterError(f"the bare base {self.name} has no task head: name an adapter")
        pool = self.pools.get(("causal-lm", 0))
        # Base rows join the causal LoRA pool's forward as "__base__" when there is one.
        if pool is not None:
            return pool
        if self._bare is None:  # one runner, so bare rows share one running batch
            self._bare = Runner(self.base, "causal-lm", None, mixed=False)
        return self._bare

    def _groups(self, rows: list[Row]) -> list[tuple[Runner, list[int]]]:
        groups: dict[tuple, tuple[Runner, list[int]]] = {}
        for i, row in enumerate(rows):
            runner = self._runner(row)
            groups.setdefault(id(runner), (runner, []))[1].append(i)
        return list(groups.values())


def _like(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    return nn.Parameter(tensor, requires_grad=False) if kind == "_parameters" else tensor


def _is_decoder(config) -> bool:
    return is_decoder_only(config)


def _head_labels(info: AdapterInfo) -> list[str] | None:
    """Labels for an adapter made elsewhere (no onebase.json): LABEL_i, as many as its head has."""
    if info.task != "sequence-classification":
        return None
    from safetensors import safe_open

    with safe_open(str(info.weights), framework="pt") as file:
        for key in file.keys():
            if any(part in key for part in ("classifier", "score")) and key.endswith("weight"):
                return [f"LABEL_{i}" for i in range(file.get_slice(key).get_shape()[0])]
    raise AdapterError(f"adapter {info.path.name}: a sequence-classification adapter without its head "
                       "(modules_to_save) cannot classify")


def _overwritten_base_tensors(info: AdapterInfo) -> set[str]:
    """Base tensors an onebase-native adapter replaces (BitFit's biases, trained layer norms)."""
    if info.peft_type is not None:
        return set()
    from safetensors import safe_open

    with safe_open(str(info.weights), framework="pt") as file:
        return set(file.keys())


def _require_loaded(model: nn.Module, info: AdapterInfo) -> None:
    """A classification adapter must bring its head: a zero head would answer with constant labels."""
    if info.task == "causal-lm" or info.peft_type is not None:
        return
    from safetensors import safe_open

    heads = tuple(f"{name}." for name in head_modules(model))
    with safe_open(str(info.weights), framework="pt") as file:
        if not any(key.startswith(heads) for key in file.keys()):
            raise AdapterError(f"adapter {info.path.name}: no task head in {info.weights.name}")


def _one_line(err: BaseException) -> str:
    return error_line(err, limit=300)


def load_path(path: str | Path) -> AdapterInfo:
    from onebase.serve.artifacts import inspect

    return inspect(Path(path))
