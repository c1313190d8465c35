"""Iteration-level (continuous) batching: sequences join and leave a running batch between steps.

A `Decoder` owns running batches, one per model (a LoRA pool's rows share one batch, whatever
their adapters; every other adapter has its own). One `step()`:
  1. feeds every running row its last sampled token (one forward per batch, KV cache reused),
     samples the next token per row with the row's own settings, and drops rows that finished
     (EOS, `max_tokens`, a stop sequence) or were cancelled, freeing their KV rows;
  2. prefills the sequences that arrived meanwhile (one left-padded forward per model), samples
     their first token and merges their KV rows into the running batch.
So a request arriving mid-generation starts at the next step instead of waiting for the batch to
end, and a long request never holds the model between steps.

With a prefill thread (`prefill_thread()`, the server's replicas) step 2 comes first and only hands
the arrivals to that thread: their prefill runs beside this and later decode steps, and the rows
join the running batch (first token sampled, KV merged) at the first step after it is done
(`prefill_worker.py`).

Streamed sequences hand out text as it becomes safe to show (not a half-decoded character, not the
start of a stop sequence) together with the logprobs of exactly the tokens that text begins: a
token's entry goes out once the text shown goes past its start offset, so the logprobs streamed add
up to the whole answer's (`_logprobs_within`), stop sequence cut off the same way.

A KV-cache budget (`kv_budget.KvBudget`, unbounded unless the server sets one) decides, with the
row limit, how many waiting sequences join: each reserves prompt + max_tokens positions, admitted
in arrival order while they fit.

Prompt-learning adapters (prefix, prompt tuning, P-tuning) are rows like the others: their virtual
tokens are computed once per adapter (`virtual.py`); a soft prompt is prefilled in front of each
prompt (attention mask extended), a prefix is the cache the prompt continues from, and every later
step decodes from the KV cache on the bare base. Rows of one such adapter share a batch.
`Decoder.recompute_prompts` brings back the old path (rows one at a time, each step recomputing
the whole sequence through PEFT's forward) for the benchmark's comparison.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from onebase.errors import error_line
from onebase.serve.kv_budget import KvBudget
from onebase.serve.prefill_worker import PrefillWorker
from onebase.serve.prefix_cache import PrefixCache, plan, reuse
from onebase.serve.virtual import prompt_learning

BASE = "__base__"
# Prompt tokens a second prefill forward must save to be worth it: it reads every weight once more and
# runs every layer's kernels again whatever its length.
SPLIT_GAIN = 32


@dataclass
class Sampling:
    """One sequence's decoding settings (OpenAI's fields)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the top k
    seed: int | None = None


@dataclass
class Sequence:
    """A prompt being continued: its tokens, its outputs so far, how to report them."""

    adapter: Any  # engine.Loaded, or None for the bare base
    runner: Any  # engine.Runner
    prompt: list[int]
    sampling: Sampling
    # Streamed pieces: (text, logprobs of the tokens it begins; None unless asked), from the decoding thread.
    on_text: Callable[[str, list[dict[str, Any]] | None], None] | None = None
    on_done: Callable[[], None] | None = None  # called from the decoding thread once finished
    error: str | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` handed to on_text
    sent: int = 0  # logprob entries handed to on_text
    finish_reason: str | None = None
    cancelled: bool = False
    kv_waited: bool = False  # held back at least once for room in the KV budget
    generator: torch.Generator | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> str | None:
        return self.adapter.key if self.adapter is not None else None

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return {"text": self.text, "finish_reason": self.finish_reason, "completion_tokens": len(self.tokens),
                "prompt_tokens": len(self.prompt),
                "logprobs": self.logprobs if self.sampling.logprobs is not None else None}


class Decoder:
    """The running batches of one engine; `step()` is called by the thread that owns the model."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.eos = _eos_ids(engine)
        self.waiting: deque[Sequence] = deque()
        self.batches: dict[int, _Batch] = {}
        self._lock = threading.Lock()
        self.finished: dict[str, int] = {}  # finish reason -> sequences (cancelled: their client went away)
        self.kv = KvBudget()  # unbounded; the server's scheduler sets the replica's budget
        self.prefix = PrefixCache()  # off; the server's scheduler sets the replica's (limits.prefix_cache_tokens)
        self.recompute_prompts = False  # True: prompt-learning rows the old way (bench/serve.py compares)
        self.worker: PrefillWorker | None = None  # None: prefill on the stepping thread (`prefill_thread`)
        self.prefilling: list[Sequence] = []  # handed to the worker, not yet joined

    def prefill_thread(self) -> None:
        """Prefill arrivals on a second thread from now on, beside the decode steps (`prefill_worker.py`)."""
        if self.worker is None:
            self.worker = PrefillWorker(torch.get_num_threads())

    def quiesce(self) -> None:
        """Until no prefill runs beside the caller (which holds the engine's lock, so none starts): before
        anything changes the model (hot load, unload)."""
        if self.worker is not None:
            self.worker.wait_idle()

    def submit(self, seq: Sequence) -> Sequence:
        if seq.sampling.temperature > 0:
            seq.generator = torch.Generator()
            if seq.sampling.seed is not None:
                seq.generator.manual_seed(seq.sampling.seed)
            else:
                seq.generator.seed()
        with self._lock:
            self.waiting.append(seq)
        return seq

    def running(self) -> int:
        return sum(len(b.seqs) for b in self.batches.values())

    def pending(self) -> int:
        return len(self.waiting) + self.running() + len(self.prefilling)

    @torch.inference_mode()
    def step(self, max_rows: int | None = None) -> None:
        """One decode step for every running row, then prefill of arrivals (up to max_rows running). With a
        prefill thread: rows it prefilled join first (waited for when nothing else runs), then arrivals go
        to it, then the decode step."""
        with self.engine.lock:
            if self.worker is not None:
                self._join_prefilled(block=not self.running())
                self._prefill_arrivals(max_rows)
            for key, batch in list(self.batches.items()):
                batch.decode(self)
                if not batch.seqs:
                    del self.batches[key]
            if self.worker is None:
                self._prefill_arrivals(max_rows)
            self.kv.note(reserved=self.kv.cost({key: batch.seqs for key, batch in self.batches.items()}),
                         held=self.held())

    def _prefill_arrivals(self, max_rows: int | None) -> None:
        """Admit waiting sequences and prefill them: here, or on the prefill thread when it is idle (else they
        wait for its next job) and their prefill is safe beside a decode step (`_Batch.overlaps`)."""
        if self.worker is not None and self.worker.busy():
            return
        room = len(self.waiting) if max_rows is None else max(0, max_rows - self.running())
        groups: dict[int, list[Sequence]] = {}
        for seq in self._admit(room):
            if seq.cancelled:
                self.finish(seq, "cancelled")
            else:
                groups.setdefault(id(seq.runner), []).append(seq)
        handed = []
        for key, seqs in groups.items():
            batch = self.batches.get(key) or _Batch(seqs[0].runner, self.recompute_prompts)
            if self.worker is not None and batch.overlaps(seqs):
                handed.append((key, batch, seqs))
                continue
            self.batches[key] = batch
            batch.admit(self, seqs)
            if not batch.seqs:
                del self.batches[key]
        if handed:
            self.prefilling = [seq for _, _, seqs in handed for seq in seqs]
            self.worker.submit(lambda: [(key, batch, seqs, _attempt(batch.prefill, self, seqs))
                                        for key, batch, seqs in handed])

    def _join_prefilled(self, block: bool) -> None:
        """The prefill thread's finished rows into their running batches (a failed prefill fails its rows)."""
        done, jobs = self.worker.take(block)
        if not done:
            return
        seqs, self.prefilling = self.prefilling, []
        if isinstance(jobs, BaseException):  # not the forwards (those fail per batch below)
            return self._fail(seqs, jobs)
        for key, batch, group, prefilled in jobs:
            if isinstance(prefilled, BaseException):
                self._fail(group, prefilled)
                continue
            batch = self.batches.setdefault(key, batch)
            batch.join(self, prefilled)
            if not batch.seqs:
                del self.batches[key]

    def _admit(self, room: int) -> list[Sequence]:
        """Sequences from the head of the queue, in order, while a row is free and their reservation fits
        the KV budget beside the running batches. A head that must wait holds back those behind it
        (no starvation of long requests); one that cannot fit even alone ends with an error."""
        groups = {key: list(batch.seqs) for key, batch in self.batches.items()}
        arrived: list[Sequence] = []
        refused: list[tuple[Sequence, str]] = []
        with self._lock:
            while self.waiting and len(arrived) < room:
                seq = self.waiting[0]
                if not seq.cancelled:
                    too_large = self.kv.alone_too_large(seq)
                    if too_large:
                        refused.append((self.waiting.popleft(), too_large))
                        continue
                    if not self.kv.fits(groups, id(seq.runner), seq):
                        self.kv.waited += not seq.kv_waited
                        seq.kv_waited = True
                        break
                    groups.setdefault(id(seq.runner), []).append(seq)
                arrived.append(self.waiting.popleft())
        for seq, reason in refused:
            seq.error = reason
            self.finish(seq, "error")
        return arrived

    def held(self) -> int:
        """KV-cache positions the running batches hold now (rows x padded width); their buffers keep spare
        rows and columns beside these (`kv_slots`: up to about twice as many, until the batch grows)."""
        return sum(len(b.seqs) * b.mask.shape[1] for b in self.batches.values() if b.cache is not None)

    def run(self, seqs: list[Sequence]) -> list[dict[str, Any]]:
        """Submit and step until these sequences are done (callers that own the model: tests, benchmarks)."""
        for seq in seqs:
            self.submit(seq)
        while not all(s.done.is_set() for s in seqs):
            self.step()
        return [s.result() for s in seqs]

    # ---- per-token bookkeeping -------------------------------------------------------------------

    def choose(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row, record it, and finish rows that are done."""
        logits = logits.float()
        for seq, row in zip(seqs, logits):
            s = seq.sampling
            if s.temperature <= 0:
                token = int(row.argmax())
            else:
                token = int(torch.multinomial(_nucleus(row / s.temperature, s.top_p), 1, generator=seq.generator))
            if s.logprobs is not None and token not in self.eos:
                # The token starts where the text so far ends (a half-decoded character is not text yet).
                seq.logprobs.append(self._logprob(row, token, s.logprobs, len(seq.text.rstrip("\ufffd"))))
            self.advance(seq, token)

    def advance(self, seq: Sequence, token: int) -> None:
        if seq.cancelled:
            return self.finish(seq, "cancelled")
        if token in self.eos:
            return self.finish(seq, "stop")
        seq.tokens.append(token)
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(stop) for stop in seq.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            seq.text = text[:cut]
            return self.finish(seq, "stop")
        seq.text = text
        if len(seq.tokens) >= seq.sampling.max_tokens:
            return self.finish(seq, "length")
        self._emit(seq, _held_back(text, seq.sampling.stop))

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = reason
            self.finished[reason] = self.finished.get(reason, 0) + 1
            if seq.sampling.logprobs is not None and reason == "stop" and seq.sampling.stop:
                seq.logprobs = _logprobs_within(seq.logprobs, len(seq.text))
            self._emit(seq, seq.text, final=True)
            seq.done.set()
            if seq.on_done is not None:
                seq.on_done()

    def fail_all(self, err: BaseException) -> None:
        """A step failed: its rows (and what waits) end with the error; the batcher starts afresh."""
        with self._lock:
            seqs, self.waiting = list(self.waiting), deque()
        seqs += [seq for batch in self.batches.values() for seq in batch.seqs]
        self.batches = {}
        if self.worker is not None:  # a prefill in flight: its rows fail too, its result is dropped
            self.worker.take(block=True)
            seqs, self.prefilling = seqs + self.prefilling, []
        self._fail(seqs, err)

    def _fail(self, seqs: list[Sequence], err: BaseException) -> None:
        message = _one_line(err)
        for seq in seqs:
            seq.error = message
            self.finish(seq, "error")

    def _emit(self, seq: Sequence, visible: str, final: bool = False) -> None:
        """Hand the new part of `visible` to on_text with the logprobs of the tokens it begins
        (`final`: the rest of the answer's logprobs, even with no new text)."""
        if seq.on_text is None:
            return
        piece = visible[seq.emitted:]
        seq.emitted = max(seq.emitted, len(visible))
        logprobs = None
        if seq.sampling.logprobs is not None:
            upto = len(seq.logprobs) if final else _begun(seq.logprobs, len(visible), seq.sent)
            logprobs, seq.sent = seq.logprobs[seq.sent:upto], max(seq.sent, upto)
        if piece or logprobs:
            seq.on_text(piece, logprobs)

    def _logprob(self, row: torch.Tensor, token: int, top: int, offset: int) -> dict[str, Any]:
        logprobs = row.log_softmax(-1)
        entry = {"token": self.tokenizer.decode([token]), "logprob": float(logprobs[token]), "top": [],
                 "offset": offset}
        if top:
            values, ids = logprobs.topk(top)
            entry["top"] = [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]
        return entry


class _Batch:
    """The rows running on one model: their KV cache (rows x positions, left-padded) and mask."""

    def __init__(self, runner, recompute_prompts: bool = False) -> None:
        self.runner = runner
        self.seqs: list[Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.last: list[int] = []
        # Prompt-learning rows run on the bare base from their virtual tokens (None: recomputed).
        self.virtual = None if recompute_prompts else getattr(runner, "virtual", None)
        self.cached = self.virtual is not None or not prompt_learning(runner.model)
        # Only the last position's logits are used: a prefill need not run the LM head on every token.
        self.keeps_last = _keeps_last_logits(runner.model)

    def decode(self, decoder: Decoder) -> None:
        live = [i for i, s in enumerate(self.seqs) if s.finish_reason is None and not s.cancelled]
        for seq in self.seqs:
            if seq.cancelled:
                decoder.finish(seq, "cancelled")
        self._keep(live)
        if not self.seqs:
            return
        if not self.cached:
            for seq in self.seqs:
                decoder.choose([seq], self._recompute(seq))
        else:
            ids = torch.tensor([[t] for t in self.last])
            self.mask = torch.cat([self.mask, torch.ones(len(self.seqs), 1, dtype=self.mask.dtype)], dim=1)
            positions = (self.mask.sum(-1, keepdim=True) - 1)
            logits = self._forward(ids, self.mask, positions, self.cache, [s.key for s in self.seqs])
            decoder.kv.note(held=decoder.held())  # finished rows leave after this forward: they count
            decoder.choose(self.seqs, logits)
        self._after(decoder)

    def admit(self, decoder: Decoder, seqs: list[Sequence]) -> None:
        """Prefill these sequences and let them join (on the stepping thread)."""
        if not self.cached:
            for seq in seqs:
                decoder.choose([seq], self._recompute(seq))
            self.seqs += seqs
            self._after(decoder)
            return
        self.join(decoder, self.prefill(decoder, seqs))

    def overlaps(self, seqs: list[Sequence]) -> bool:
        """Whether these rows' prefill may run on the prefill thread beside decode steps on the same model:
        cached rows of a plain model or of a LoRA pool's gathered path; not PEFT's `adapter_names` path
        (forward hooks on the model), not prompt-learning rows."""
        if not self.cached or self.virtual is not None:
            return False
        return not self.runner.mixed or self._gathered([s.key for s in seqs]) is not None

    def _gathered(self, keys: list[str | None]):
        """The LoRA pool's gathered path when it covers these rows' adapters (else None: a pool's rows take
        PEFT's `adapter_names` path, any other model its plain forward)."""
        runner = self.runner
        if runner.mixed and runner.gathered is not None and runner.gathered.covers(keys):
            return runner.gathered
        return None

    def prefill(self, decoder: Decoder, seqs: list[Sequence]) -> list[tuple[list[Sequence], torch.Tensor, Any,
                                                                            torch.Tensor]]:
        """The prompts' forwards, per group: (rows, last logits, KV cache, mask). Reads and feeds the prefix
        cache but none of this batch's running rows, so it may run on the prefill thread."""
        groups = [seqs] if self.virtual is not None else self._reuse_groups(decoder.prefix, seqs)
        out = []
        for group in groups:
            width = max(len(s.prompt) for s in group)
            ids, mask = _left_padded(group, width, decoder.tokenizer.pad_token_id or 0)
            if self.virtual is not None:
                logits, cache, mask = self._prefill_virtual(ids, mask)
            else:
                logits, cache = self._prefill(decoder.prefix, group, ids, mask)
                self._keep_prompts(decoder.prefix, group, cache, width)
            out.append((group, logits, cache, mask))
        return out

    def join(self, decoder: Decoder, prefilled: list) -> None:
        """Prefilled rows join: first token sampled, KV merged into the batch (the stepping thread)."""
        for group, logits, cache, mask in prefilled:
            decoder.choose(group, logits)
            self._merge(group, cache, mask)
            decoder.kv.note(held=decoder.held())
        self._after(decoder)

    def _reuse_groups(self, prefix: PrefixCache, seqs: list[Sequence]) -> list[list[Sequence]]:
        """The arrivals as one prefill, or as two (rows that reuse kept KV, then the others) when the
        others would cut the first rows' reuse by at least SPLIT_GAIN tokens: one forward gives every row
        the same reused columns (`prefix_cache.plan`), so a long prompt with nothing kept makes its group
        compute everything."""
        if not prefix.max_tokens or len(seqs) < 2:
            return [seqs]
        hits = [prefix.lookup(self._owner(s), s.prompt, touch=False)[0] for s in seqs]
        reusing = [s for s, h in zip(seqs, hits) if h]
        if not reusing or len(reusing) == len(seqs):
            return [seqs]
        together = sum(reuse([len(s.prompt) for s in seqs], hits))
        apart = sum(reuse([len(s.prompt) for s in reusing], [h for h in hits if h]))
        if apart - together < SPLIT_GAIN:
            return [seqs]
        return [reusing, [s for s, h in zip(seqs, hits) if not h]]

    def _prefill(self, prefix: PrefixCache, seqs: list[Sequence], ids: torch.Tensor, mask: torch.Tensor):
        """One forward over the left-padded prompts; the leading columns the prefix cache holds for every
        row (`prefix_cache.plan`) come from there instead of being computed."""
        from transformers import DynamicCache

        lengths = [len(s.prompt) for s in seqs]
        found = [prefix.lookup(self._owner(s), s.prompt) for s in seqs]
        hits = [n for n, _ in found]  # 0 exactly where nothing is kept
        start, reused = plan(lengths, hits), reuse(lengths, hits)
        cache = DynamicCache()
        if start:
            like = next(e for (_, e), r in zip(found, reused) if r)  # the longest prompt's, at least
            for layer in range(len(like.layers)):
                keys, values = zip(*(_kept(e or like, layer, r if e else 0, start) for (_, e), r in zip(found, reused)))
                cache.update(torch.cat(keys), torch.cat(values), layer)
        prefix.count(lengths, reused)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
        return self._forward(ids[:, start:], mask, positions, cache, [s.key for s in seqs]), cache

    def _keep_prompts(self, prefix: PrefixCache, seqs: list[Sequence], cache, width: int) -> None:
        """Hand each prompt's KV (its own copy: the batch's tensors are re-made as rows come and go) to the
        prefix cache."""
        for row, seq in enumerate(seqs):
            if prefix.wants(self._owner(seq), seq.prompt):
                start = width - len(seq.prompt)
                prefix.store(self._owner(seq), seq.prompt,
                             [(layer.keys[row:row + 1, :, start:].clone(), layer.values[row:row + 1, :, start:].clone())
                              for layer in cache.layers])

    def _owner(self, seq: Sequence) -> tuple[int, str | None]:
        return id(self.runner), seq.key

    def _after(self, decoder: Decoder) -> None:
        """Drop finished rows (their KV rows go) and remember each live row's unfed token."""
        self._keep([i for i, s in enumerate(self.seqs) if s.finish_reason is None])
        self.last = [s.tokens[-1] for s in self.seqs]

    def _prefill_virtual(self, ids: torch.Tensor, mask: torch.Tensor):
        """Prefill behind the adapter's virtual tokens, laid out as PEFT does ([virtual, padding, prompt],
        their mask columns ones): a soft prompt enters as input embeddings, a prefix as the cache. Positions
        count the virtual tokens, as PEFT's own (cache-less) forward and its generate do."""
        virtual = self.virtual
        mask = torch.cat([torch.ones(len(ids), virtual.count, dtype=mask.dtype), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = virtual.cache(len(ids))
        if virtual.prefix is not None:
            out = virtual.base(input_ids=ids, attention_mask=mask, position_ids=positions[:, virtual.count:],
                               past_key_values=cache, use_cache=True, **self._last_only(ids.shape[1]))
        else:
            out = virtual.base(inputs_embeds=virtual.inputs(ids), attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=True, **self._last_only(mask.shape[1]))
        return out.logits[:, -1], cache, mask

    def _forward(self, ids, mask, positions, cache, keys: list[str | None]) -> torch.Tensor:
        runner = self.runner
        if self.virtual is not None:  # after prefill a prompt-learning row is a plain row of the base
            return self.virtual.base(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                     use_cache=True, **self._last_only(ids.shape[1])).logits[:, -1]
        kwargs: dict[str, Any] = self._last_only(ids.shape[1])
        gathered = self._gathered(keys)
        if runner.mixed and gathered is None:
            kwargs["adapter_names"] = [k or BASE for k in keys]
        if gathered is not None:
            with gathered.rows(keys):
                out = runner.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                   past_key_values=cache, use_cache=True, **kwargs)
        else:
            out = runner.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                               use_cache=True, **kwargs)
        return out.logits[:, -1]

    def _last_only(self, length: int) -> dict[str, Any]:
        """The forward argument that keeps only the last of `length` positions' logits. An index, not the
        int 1: transformers slices the hidden states with it, and the LM head over the strided slice of a
        prefill made torch copy its whole weight once per row (docs/benchmarks.md issue #12 (e6))."""
        return {"logits_to_keep": torch.tensor([length - 1])} if self.keeps_last else {}

    def _recompute(self, seq: Sequence) -> torch.Tensor:
        ids = torch.tensor([seq.prompt + seq.tokens])
        return self.runner.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]

    def _merge(self, seqs: list[Sequence], cache, mask: torch.Tensor) -> None:
        """The prefilled rows join: their KV is written into the batch's buffers (`kv_slots`)."""
        from onebase.serve.kv_slots import SlotCache

        if self.cache is None or not self.seqs:
            self.cache, self.mask, self.seqs = SlotCache(cache.layers), mask, list(seqs)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)])
        self.cache.append(cache.layers)
        self.seqs += seqs

    def _keep(self, rows: list[int]) -> None:
        """Keep these rows (ascending); the cache fills the places of rows that left with later rows, and
        the rows' order follows it."""
        if len(rows) == len(self.seqs):
            return
        if self.cached and self.cache is not None and rows:
            rows = self.cache.keep(rows)
            self.mask = self.mask[torch.tensor(rows)]
            start = int((self.mask.sum(0) > 0).int().argmax())  # columns that are padding for every row go
            self.mask = self.mask[:, start:]
            self.cache.trim(start)
        elif not rows:
            self.cache, self.mask = None, None
        self.seqs = [self.seqs[i] for i in rows]
        self.last = [s.tokens[-1] for s in self.seqs]  # live rows always hold their unfed token


def _left_padded(seqs: list[Sequence], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' token ids left-padded to `width`, and their attention mask."""
    ids = torch.tensor([[pad] * (width - len(s.prompt)) + s.prompt for s in seqs])
    mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in seqs])
    return ids, mask


def _kept(entry, layer: int, count: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A kept prompt's first `count` positions of one layer's keys and values, left-padded to `width`."""
    keys, values = entry.layers[layer]
    return _left_pad(keys[:, :, :count], width, -2), _left_pad(values[:, :, :count], width, -2)


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    probs = logits.softmax(-1)
    if top_p >= 1:
        return probs
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(-1) - ordered < top_p  # the smallest prefix whose mass reaches top_p
    filtered = torch.zeros_like(probs).scatter(0, order, ordered * keep)
    return filtered / filtered.sum()


def _held_back(text: str, stops: tuple[str, ...]) -> str:
    """The part of `text` safe to stream: not a half-decoded character, not the start of a stop sequence."""
    text = text.rstrip("\ufffd")
    hold = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[: len(text) - hold]


def _logprobs_within(entries: list[dict[str, Any]], length: int) -> list[dict[str, Any]]:
    """The logprobs of the tokens that begin within the first `length` characters of the text (the
    returned text when a stop sequence was cut off)."""
    return entries[:_begun(entries, length)]


def _begun(entries: list[dict[str, Any]], length: int, start: int = 0) -> int:
    """How many entries (counting on from `start`, all begun) begin within the first `length` characters."""
    while start < len(entries) and entries[start]["offset"] < length:
        start += 1
    return start


def _keeps_last_logits(model) -> bool:
    """Whether the causal LM under `model` (PEFT passes the argument through) takes `logits_to_keep`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _eos_ids(engine) -> set[int]:
    ids = {engine.tokenizer.eos_token_id}
    configured = getattr(getattr(engine.base, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def _attempt(fn: Callable[..., Any], *args) -> Any:
    """fn's result, or the exception it raised (one batch's failed prefill must not fail the others)."""
    try:
        return fn(*args)
    except Exception as err:
        return err


def _one_line(err: BaseException) -> str:
    return f"generation failed: {error_line(err, limit=300)}"
