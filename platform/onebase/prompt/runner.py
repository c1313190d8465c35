"""Run a prompt program on an already loaded causal LM and tokenizer (e.g. a server's shared base).

    runner = ProgramRunner(model, tokenizer, program)
    runner.classify(["I love it"])      # -> [{"negative": 0.1, "neutral": 0.2, "positive": 0.7}]
    runner.predict(texts)               # -> [Prediction(answer, probs, text, samples, prompt_tokens)]
    runner.generate(texts)              # -> generated texts (generation programs)

With fixed demonstrations the instruction + demos prefix is run once, here, and its KV cache is
reused by every batch (`cache_prefix=False` recomputes it each time, with identical outputs).
The model is only read: no weight is written and no module is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onebase.prompt import calibration
from onebase.prompt.answers import extract, match_label, normalise, vote
from onebase.prompt.lm import PrefixLM, Sampling
from onebase.prompt.program import Demo, Program
from onebase.prompt.render import answer_lead, head_ids, render, text_ids


@dataclass
class Prediction:
    answer: str | None  # the label (classification) or the extracted answer (generation); None: none found
    probs: dict[str, float] | None = None  # classification: calibrated label probabilities (or vote shares)
    text: str = ""  # generated text of the final path (reasoning included); "" for direct loglik scoring
    samples: list[str | None] = field(default_factory=list)  # self-consistency: each path's answer
    prompt_tokens: int = 0


class ProgramRunner:
    def __init__(self, model, tokenizer, program: Program, cache_prefix: bool = True, batch_size: int = 8) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.program = program
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                         if isinstance(i, int) and i != tokenizer.unk_token_id}
        self.lead = answer_lead(program)
        self.similar = program.demo_selection == "similar" and program.k > 0
        demos = [] if self.similar else program.demos
        self.rendered = render(program, tokenizer, demos)
        prefix = [] if self.similar else head_ids(program, tokenizer, self.rendered.head)
        self.lm = PrefixLM(model, prefix, self.pad_id, cached=cache_prefix)
        self._pool_vectors: torch.Tensor | None = None

    # ---- public API ----------------------------------------------------------------------

    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        if not self.program.is_classification:
            raise ValueError(f"program {self.program.name} is a generation program; it does not classify")
        return [p.probs or {} for p in self.predict(texts)]

    def generate(self, texts: list[str]) -> list[str]:
        return [p.text for p in self.predict(texts)]

    def predict(self, texts: list[str]) -> list[Prediction]:
        out: list[Prediction] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start: start + self.batch_size]
            rows = [self.query_row(t) for t in chunk]
            out += self._predict_rows(chunk, rows)
            for prediction, row in zip(out[-len(chunk):], rows):
                prediction.prompt_tokens = self.lm.prefix_len + len(row)
        return out

    def content_free_probs(self) -> list[float]:
        """p_cf for contextual calibration: the content-free inputs scored with this prompt."""
        rows = [self.query_row(t) for t in self.program.calibration.content_free]
        return calibration.content_free_probs(self._label_probs(rows))

    def prompt_tokens(self, text: str) -> int:
        return self.lm.prefix_len + len(self.query_row(text))

    # ---- prompts -------------------------------------------------------------------------

    def query_row(self, text: str) -> list[int]:
        """The query's tokens after the shared prefix (with `similar` demos: its whole prompt)."""
        if not self.similar:
            return text_ids(self.tokenizer, self.rendered.text(text)[len(self.rendered.head):])
        rendered = render(self.program, self.tokenizer, self.neighbours(text))
        return head_ids(self.program, self.tokenizer, rendered.head) + \
            text_ids(self.tokenizer, text + rendered.tail)

    def neighbours(self, text: str) -> list[Demo]:
        """The k pool demos nearest the query by cosine of the base's mean-pooled hidden states,
        the nearest last (closest to the query)."""
        pool = self.program.demo_pool
        if self._pool_vectors is None:
            self._pool_vectors = self._embed([d.input for d in pool])
        query = self._embed([text])[0]
        sims = torch.nn.functional.cosine_similarity(self._pool_vectors, query[None], dim=-1)
        top = sims.topk(min(self.program.k, len(pool))).indices.tolist()
        return [pool[i] for i in reversed(top)]

    def _embed(self, texts: list[str]) -> torch.Tensor:
        vectors = [self.lm.mean_hidden([text_ids(self.tokenizer, t) or [self.pad_id] for t in texts[i: i + 32]])
                   for i in range(0, len(texts), 32)]
        return torch.cat(vectors)

    # ---- scoring -------------------------------------------------------------------------

    def _predict_rows(self, texts: list[str], rows: list[list[int]]) -> list[Prediction]:
        program = self.program
        if program.reasoning.mode == "least-to-most":
            from onebase.prompt.reasoning import least_to_most

            return least_to_most(self, texts, rows)
        if program.reasoning.mode == "cot":
            from onebase.prompt.reasoning import chain_of_thought

            return chain_of_thought(self, rows)
        if program.is_classification and program.scoring == "loglik":
            return [self._label_prediction(p) for p in self._label_probs(rows, calibrated=True)]
        return self._vote_generations(rows, [[] for _ in rows], self.answer_of)

    def _label_prediction(self, probs: list[float]) -> Prediction:
        labels = self.program.label_names
        return Prediction(answer=labels[max(range(len(labels)), key=probs.__getitem__)],
                          probs=dict(zip(labels, probs)))

    def _label_probs(self, rows: list[list[int]], calibrated: bool = False,
                     lead: str | None = None) -> list[list[float]]:
        """Label probabilities after each row: logsumexp over a label's verbalizers, softmax over labels."""
        lead = self.lead if lead is None else lead
        labels = self.program.labels or {}
        choices = [text_ids(self.tokenizer, lead + word) for words in labels.values() for word in words]
        scores = self.lm.loglik(rows, choices, self.batch_size)
        per_row = []
        for row_scores in scores:  # a label's score: logsumexp over its verbalizers
            at, merged = 0, []
            for words in labels.values():
                merged.append(float(torch.logsumexp(torch.tensor(row_scores[at: at + len(words)]), 0)))
                at += len(words)
            per_row.append(merged)
        probs = calibration.label_probs(per_row)
        if calibrated and self.program.calibration.mode == "contextual":
            if self.program.calibration.p_cf is None:
                self.program.calibration.p_cf = self.content_free_probs()
            probs = calibration.calibrate(probs, self.program.calibration.p_cf)
        return probs

    def answer_of(self, text: str) -> str | None:
        if self.program.is_classification:
            return match_label(text, self.program.labels or {})
        return extract(self.program.extractor, text, self.program.labels)

    def sampling(self) -> tuple[int, Sampling]:
        sc = self.program.self_consistency
        if sc.samples <= 1:
            return 1, Sampling()
        return sc.samples, Sampling(sc.temperature, sc.top_p, sc.seed)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _vote_generations(self, rows: list[list[int]], extra: list[list[int]], answer_of) -> list[Prediction]:
        """n paths per row (1 greedy, or n sampled), each answered by `answer_of`, then the vote."""
        n, sampling = self.sampling()
        paths = [r + e for r, e in zip(rows, extra)] * n  # path j of row i sits at j * len(rows) + i
        outs = self.lm.generate(paths, self.program.max_new_tokens, self.stop_ids, sampling)
        texts = [self.decode(o) for o in outs]
        return [self._voted([texts[j * len(rows) + i] for j in range(n)], answer_of) for i in range(len(rows))]

    def _voted(self, texts: list[str], answer_of) -> Prediction:
        answers = [answer_of(t) for t in texts]
        winner = vote(answers)
        chosen = next((t for t, a in zip(texts, answers) if normalise(a) == winner), texts[0])
        # The winner in the spelling a path gave it (a label's own name for classification).
        answer = next((a for a in answers if a is not None and normalise(a) == winner), None)
        probs = None
        if self.program.is_classification:
            if len(texts) > 1:
                probs = {label: sum(a == label for a in answers) / len(answers) for label in self.program.label_names}
            else:
                probs = {label: float(label == answer) for label in self.program.label_names}
        return Prediction(answer=answer, probs=probs, text=chosen, samples=answers)
