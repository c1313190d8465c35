"""Serving benchmark (issue #4): SmolLM2-135M-Instruct (fp32, 2 threads), 100 LoRA adapters (r=8, q/v).

(a) throughput through the real HTTP server with 1, 10 and 100 adapters resident, a uniformly random
    adapter per request, concurrent clients; a single-adapter run for the mixed/single ratio; and the
    naive baseline (plain PEFT, one request at a time, `set_adapter` per request, 10 adapters).
(b) hot-load latency p50/p95 with 1, 10 and 100 adapters already resident (the replica's load path).
(c) RSS growth for 100 adapters vs the bytes of their tensors, and vs 100 separate model copies.

(d) issue #12, engine level (in-process, no HTTP): tokens/s at batch 16 with 1, 10 and 100 distinct
    LoRA adapters resident (r=8), the gathered LoRA forward and PEFT's mixed forward side by side.
(e) issue #12, through HTTP: Poisson arrivals at a fixed offered load, `max_tokens` drawn from 4-64,
    streamed requests (time to first token, per-token latency), 10 and 100 adapters, against naive
    serving (plain PEFT, one request at a time, set_adapter per request, the same request mix); the
    same load again beside one long streaming request (its effect on the others' p95).
(f) issue #12, hot load through the admin API end to end (fetch, checks, every replica) at 1, 10, 100
    adapters resident.

    .venv/bin/python bench/serve.py                 # ~5 min on 2 cores
    .venv/bin/python bench/serve.py --requests 32   # quicker, noisier
    .venv/bin/python bench/serve.py --engine --poisson 40 --rate 4   # (d)-(f) only -> bench/results/serve-12.json
    .venv/bin/python bench/serve.py --prompt-learning   # (g) only -> bench/results/serve-12-prompt-learning.json

(g) issue #12, engine level: tokens/s of a batch of 8 requests to one prompt-tuning and to one
    prefix-tuning adapter (16 virtual tokens each), decoded from the KV cache as batcher rows, beside
    the old path (rows one at a time, every step recomputing the sequence through PEFT's forward).
Prints and writes bench/results/serve.json (serve-12.json for the issue #12 figures).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write one sentence about the weather in Paris during the spring months of the year.",
    "Explain in a few words why the sky looks blue on a clear and sunny afternoon today.",
    "Give a short reason to learn a second language when you are already an adult person.",
    "Describe your favourite breakfast and why you like it so much in one short sentence.",
]
NEW_TOKENS = 16
COUNTS = (1, 10, 100)
BATCH_WAIT_MS = 100  # a batch waits this long to fill (it starts at once when full)
# Chat requests: as raw completions, these instruct-model prompts often end at once with EOS, which
# would compare batches of 16 tokens with requests of 0. Through the chat template every answer
# runs the full 16 tokens, in the naive loop and through the server alike.


def make_adapters(root: Path, count: int) -> list[Path]:
    """count LoRA adapters (r=8 on q_proj, v_proj) with distinct random weights, in PEFT format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from onebase.model.assets import smollm2_path
    from onebase.model.build import base_fingerprint

    paths = [root / f"adapter{i:03d}" for i in range(count)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    fingerprint = base_fingerprint(model)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                  target_modules=["q_proj", "v_proj"]))
    for i, path in enumerate(paths):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        peft_model.save_pretrained(path)
        (path / "onebase.json").write_text(json.dumps({"task": "causal-lm", "method": "lora", "labels": None,
                                                       "base_fingerprint": fingerprint}))
    return paths


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def engine_figures(adapters: list[Path]) -> dict:
    """(b) and (c), in this process: the same load path a replica runs."""
    from onebase.serve.artifacts import inspect
    from onebase.serve.engine import BaseEngine

    gc.collect()
    before_base = rss_mb()
    engine = BaseEngine("smollm2-135m-instruct", threads=2)
    gc.collect()
    base_mb = rss_mb() - before_base
    infos = [inspect(p) for p in adapters]
    latencies: dict[str, dict[str, float]] = {}
    probes = [inspect(p) for p in adapters[-20:]]
    resident = []
    for level in (1, 10, 100 - len(probes)):
        while len(resident) < level:
            resident.append(engine.load(f"r{len(resident)}", infos[len(resident)]))
        times = []
        for i, info in enumerate(probes):
            started = time.perf_counter()
            loaded = engine.load(f"probe{i}", info)
            times.append((time.perf_counter() - started) * 1000)
            engine.unload(loaded)
        latencies[str(level if level != 100 - len(probes) else 100)] = {
            "p50_ms": statistics.median(times), "p95_ms": percentile(times, 0.95), "loads": len(times)}
    for loaded in resident:
        engine.unload(loaded)
    gc.collect()
    start_mb = rss_mb()
    held = [engine.load(f"m{i}", info) for i, info in enumerate(infos)]
    gc.collect()
    growth_mb = rss_mb() - start_mb
    tensor_mb = sum(info.nbytes for info in infos) / 2**20
    assert len(held) == len(infos)
    return {"hot_load": latencies,
            "rss": {"base_mb": base_mb, "adapters": len(infos), "adapter_tensor_mb": tensor_mb,
                    "growth_mb": growth_mb, "growth_over_tensor_bytes": growth_mb / tensor_mb,
                    "hundred_model_copies_mb": 100 * base_mb,
                    "growth_vs_hundred_copies": growth_mb / (100 * base_mb)}}


def naive_baseline(adapters: list[Path], requests: int) -> dict:
    """Plain PEFT, one request at a time, set_adapter per request, 10 adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onebase.model.assets import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                      str(adapters[0]), adapter_name="a0").eval()
    for i, adapter in enumerate(adapters[1:10], start=1):
        model.load_adapter(str(adapter), adapter_name=f"a{i}")
    rng = random.Random(0)
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for k in range(requests):
            model.set_adapter(f"a{rng.randrange(10)}")
            text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                                                 tokenize=False, add_generation_prompt=True)
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    elapsed = time.perf_counter() - started
    return {"requests": requests, "seconds": elapsed, "req_per_s": requests / elapsed,
            "prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens_per_request": tokens / requests}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_load(url: str, models: list[str], requests_total: int, concurrency: int) -> dict:
    import requests

    rng = random.Random(1)
    plan = [(rng.choice(models), PROMPTS[k % len(PROMPTS)]) for k in range(requests_total)]
    lock, failures, latencies, tokens = threading.Lock(), [], [], []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                if not plan:
                    return
                model, prompt = plan.pop()
            began = time.perf_counter()
            r = session.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": NEW_TOKENS,
                "temperature": 0})
            with lock:
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - began)
                    tokens.append(r.json()["usage"]["completion_tokens"])
                else:
                    failures.append(r.text[:200])

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"requests": requests_total, "concurrency": concurrency, "distinct_adapters": len(set(models)),
            "seconds": elapsed, "req_per_s": len(latencies) / elapsed, "failed": len(failures),
            "p50_latency_s": statistics.median(latencies) if latencies else None,
            "new_tokens_per_request": sum(tokens) / max(len(tokens), 1)}


def start_server(base: dict, max_tokens: int, limits: dict | None = None, threads: int = 2) -> str:
    """A real onebase Serve app for SmolLM2 on local Ray (one replica, `threads` torch threads); its URL
    once healthy."""
    from ray import serve

    from onebase.serve.app import build
    from onebase.serve.client import Client
    from onebase.train.launch import connect_ray

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="obbench-", dir="/tmp"))
    connect_ray(None)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"bases": [{"name": "smollm2-135m-instruct", "alias": "smollm2", "threads": threads, "cpus": 1,
                       "max_adapters": 128, "max_batch_size": 16, **base}],
            "auth": {"admin_token": "bench"}, "limits": {"max_tokens": max_tokens, **(limits or {})}}
    serve.run(build(args), name="onebase", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    Client(url).wait_ready(300)  # raises ServeError when the app is not up by then
    return url


def server_figures(adapters: list[Path], requests_total: int, concurrency: int) -> dict:
    import requests
    from ray import serve


    url = start_server({"batch_wait_ms": BATCH_WAIT_MS}, NEW_TOKENS)
    admin = {"Authorization": "Bearer bench"}
    results: dict[str, dict] = {}
    loaded: list[str] = []
    try:
        for count in COUNTS:
            while len(loaded) < count:
                name = f"adapter{len(loaded):03d}"
                r = requests.post(f"{url}/admin/adapters", headers=admin, timeout=300,
                                  json={"id": name, "source": str(adapters[len(loaded)])})
                r.raise_for_status()
                loaded.append(name)
            # Warm every adapter on the replica first: this measures serving, not loading.
            http_load(url, loaded, len(loaded), min(concurrency, len(loaded)))
            results[f"mixed_{count}"] = http_load(url, loaded, requests_total, concurrency)
            print(json.dumps({f"mixed_{count}": results[f"mixed_{count}"]}), flush=True)
            if count == 10:
                results["single_1_of_10"] = http_load(url, loaded[:1], requests_total, concurrency)
                print(json.dumps({"single_1_of_10": results["single_1_of_10"]}), flush=True)
    finally:
        serve.shutdown()
    return results


def engine_throughput(adapters: list[Path], batch: int = 16, new_tokens: int = 24, rounds: int = 2,
                      counts: tuple[int, ...] = COUNTS) -> dict:
    """(d): tokens/s of one batch of `batch` rows, each row a random resident adapter."""
    from onebase.serve.artifacts import inspect
    from onebase.serve.engine import BaseEngine, Row

    engine = BaseEngine("smollm2-135m-instruct", threads=2)
    loaded = [engine.load(f"e{i}", inspect(p)) for i, p in enumerate(adapters[:100])]
    gathered = loaded[0].runner.gathered
    texts = [engine.render_chat([{"role": "user", "content": p}], None) for p in PROMPTS]
    rng = random.Random(2)
    figures: dict[str, dict] = {}
    for count in counts:
        for path in ("gathered", "peft"):
            gathered.enabled = path == "gathered"
            tokens, seconds = 0, 0.0
            for _ in range(rounds):
                rows = [Row(loaded[rng.randrange(count)], texts[k % len(texts)], max_tokens=new_tokens)
                        for k in range(batch)]
                started = time.perf_counter()
                results = engine.generate(rows)
                seconds += time.perf_counter() - started
                tokens += sum(r["completion_tokens"] for r in results)
            figures[f"{path}_{count}"] = {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds}
            print(json.dumps({f"engine_{path}_{count}": figures[f"{path}_{count}"]}), flush=True)
    gathered.enabled = True
    rate = {key: value["tokens_per_s"] for key, value in figures.items()}
    top = max(counts)
    figures["ratios"] = {f"{path}_{top}_over_1": rate[f"{path}_{top}"] / rate[f"{path}_1"]
                         for path in ("gathered", "peft")}
    figures["ratios"][f"gathered_over_peft_{top}"] = rate[f"gathered_{top}"] / rate[f"peft_{top}"]
    return figures


def request_mix(count: int, seed: int) -> list[tuple[int, str, int]]:
    """(adapter draw, prompt, max_tokens 4-64) per request, the same for the server and the naive loop."""
    rng = random.Random(seed)
    return [(rng.randrange(1 << 30), PROMPTS[k % len(PROMPTS)], rng.randint(4, 64)) for k in range(count)]


def naive_mixed(adapters: list[Path], mix: list[tuple[int, str, int]], count: int, dtype: str = "float32") -> dict:
    """Naive serving of the same request mix: one request at a time, set_adapter per request (the base in
    `dtype`, PEFT's LoRA weights as PEFT keeps them)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onebase.model.assets import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)),
                                      str(adapters[0]), adapter_name="a0").eval()
    for i, adapter in enumerate(adapters[1:count], start=1):
        model.load_adapter(str(adapter), adapter_name=f"a{i}")
    started, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for draw, prompt, max_tokens in mix:
            model.set_adapter(f"a{draw % count}")
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    elapsed = time.perf_counter() - started
    return {"requests": len(mix), "adapters": count, "dtype": dtype, "seconds": elapsed,
            "req_per_s": len(mix) / elapsed, "tokens_per_s": tokens / elapsed}


def poisson_load(url: str, models: list[str], mix: list[tuple[int, str, int]], rate: float,
                 long_stream: bool = False) -> dict:
    """(e): streamed chat requests arriving as a Poisson process of `rate` req/s."""
    import requests

    rng = random.Random(3)
    records: list[dict] = []
    lock = threading.Lock()

    def one(model: str, prompt: str, max_tokens: int, record: bool = True) -> None:
        began, first, pieces, tokens = time.perf_counter(), None, 0, 0
        with requests.post(f"{url}/v1/chat/completions", stream=True, timeout=600, json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as r:
            ok = r.status_code == 200
            for line in r.iter_lines():
                if line.startswith(b"data: {") and b'"content"' in line:
                    pieces += 1  # an event may carry several tokens (the replica coalesces under load)
                    first = first or time.perf_counter()
                elif line.startswith(b"data: {") and b'"usage"' in line:
                    tokens = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens") or tokens
        done = time.perf_counter()
        if record:
            with lock:
                records.append({"ok": ok, "latency": done - began, "ttft": (first or done) - began,
                                "per_token": (done - (first or done)) / max(tokens - 1, 1), "pieces": pieces,
                                "tokens": tokens})

    threads = []
    if long_stream:
        threads.append(threading.Thread(target=one, args=(models[0], PROMPTS[0], 256, False)))
        threads[-1].start()
        time.sleep(0.5)
    started = time.perf_counter()
    for draw, prompt, max_tokens in mix:
        time.sleep(rng.expovariate(rate))
        t = threading.Thread(target=one, args=(models[draw % len(models)], prompt, max_tokens))
        t.start()
        threads.append(t)
    for t in threads[1 if long_stream else 0:]:
        t.join()
    elapsed = time.perf_counter() - started
    if long_stream:
        threads[0].join()
    good = [r for r in records if r["ok"]]

    def stat(key: str) -> dict:
        values = [r[key] for r in good]
        return {"p50": statistics.median(values), "p95": percentile(values, 0.95)} if values else {}

    return {"requests": len(mix), "failed": len(records) - len(good), "offered_req_per_s": rate,
            "tokens": sum(r["tokens"] for r in good),
            "tokens_per_event": sum(r["tokens"] for r in good) / max(sum(r["pieces"] for r in good), 1),
            "seconds": elapsed, "req_per_s": len(good) / elapsed, "ttft_s": stat("ttft"),
            "per_token_s": stat("per_token"), "latency_s": stat("latency"), "long_stream": long_stream}


def issue12_server(adapters: list[Path], mix: list[tuple[int, str, int]], rate: float,
                   counts: tuple[int, ...] = COUNTS) -> dict:
    """(e) and (f) against one real server (one replica, 2 threads)."""
    import requests
    from ray import serve


    url = start_server({"max_queue": 256}, 256)
    admin = {"Authorization": "Bearer bench"}
    results: dict[str, dict] = {"hot_load_admin": {}}
    loaded: list[str] = []
    try:
        for count in counts:
            times = []
            while len(loaded) < count:
                name = f"adapter{len(loaded):03d}"
                began = time.perf_counter()
                r = requests.post(f"{url}/admin/adapters", headers=admin, timeout=300,
                                  json={"id": name, "source": str(adapters[len(loaded)])})
                r.raise_for_status()
                times.append((time.perf_counter() - began) * 1000)
                loaded.append(name)
            last = times[-min(len(times), 10):]  # the loads that found about `count` adapters resident
            results["hot_load_admin"][str(count)] = {"p50_ms": statistics.median(last), "loads": len(last)}
            if count == 1:
                continue
            results[f"poisson_{count}"] = poisson_load(url, loaded, mix, rate)
            print(json.dumps({f"poisson_{count}": results[f"poisson_{count}"]}), flush=True)
            if count == 10:
                results["poisson_10_long_stream"] = poisson_load(url, loaded, mix, rate, long_stream=True)
                print(json.dumps({"poisson_10_long_stream": results["poisson_10_long_stream"]}), flush=True)
    finally:
        serve.shutdown()
    return results


def issue12(args) -> None:
    out_dir = REPO / "bench" / "results"
    adapters = make_adapters(out_dir / "serve-adapters", 100)
    figures: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
                                " (shared with other jobs while measured)",
                     "date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M-Instruct fp32"}
    if (REPO / "bench" / "results" / "serve-12.json").is_file():  # runs of (d) and (e)/(f) add to one file
        figures = {**json.loads((REPO / "bench" / "results" / "serve-12.json").read_text()), **figures}
    if args.engine:
        figures["engine"] = engine_throughput(adapters, new_tokens=args.new_tokens, rounds=args.rounds,
                                              counts=tuple(int(c) for c in args.counts.split(",")))
        gc.collect()
    if args.poisson:
        mix = request_mix(args.poisson, seed=4)
        naive_mix = mix[: args.naive_requests]
        counts = tuple(int(c) for c in args.counts.split(","))
        figures["naive"] = {str(n): naive_mixed(adapters, naive_mix, n) for n in counts if n > 1}
        print(json.dumps({"naive": figures["naive"]}), flush=True)
        gc.collect()
        figures["http"] = issue12_server(adapters, mix, args.rate, counts)
        http = figures["http"]
        figures["ratios"] = {f"poisson_{n}_over_naive": http[f"poisson_{n}"]["req_per_s"]
                             / figures["naive"][str(n)]["req_per_s"] for n in counts if n > 1}
        if "poisson_10_long_stream" in http:
            figures["ratios"]["p95_latency_with_long_stream_over_without"] = (
                http["poisson_10_long_stream"]["latency_s"]["p95"] / http["poisson_10"]["latency_s"]["p95"])
    print(json.dumps({k: v for k, v in figures.items() if k in ("ratios", "engine")}, indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve-12.json").write_text(json.dumps(figures, indent=2))
    print(f"wrote {out_dir / 'serve-12.json'}")


def make_prompt_learning_adapters(root: Path, virtual: int = 16) -> dict[str, Path]:
    """A prompt-tuning and a prefix-tuning adapter on SmolLM2 with random virtual tokens, in PEFT format."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from onebase.model.assets import smollm2_path
    from onebase.model.build import base_fingerprint

    configs = {"prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual),
               "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual)}
    paths = {name: root / name for name in configs}
    for name, config in configs.items():
        if (paths[name] / "adapter_model.safetensors").is_file():
            continue
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        torch.manual_seed(5)
        tuned = get_peft_model(model, config)
        with torch.no_grad():  # on the scale of the model's own embeddings / activations
            for param in tuned.parameters():
                if param.requires_grad:
                    param.normal_(0, 0.05)
        tuned.save_pretrained(paths[name])
        (paths[name] / "onebase.json").write_text(json.dumps({
            "task": "causal-lm", "method": name, "labels": None, "base_fingerprint": base_fingerprint(model)}))
    return paths


def prompt_learning_throughput(args) -> None:
    """(g): tokens/s of `--batch` requests to one prompt-learning adapter, cached rows vs recomputed."""
    from onebase.serve.artifacts import inspect
    from onebase.serve.engine import BaseEngine, Row

    out_dir = REPO / "bench" / "results"
    paths = make_prompt_learning_adapters(out_dir / "serve-adapters-prompt-learning")
    engine = BaseEngine("smollm2-135m-instruct", threads=2)
    texts = [engine.render_chat([{"role": "user", "content": p}], None) for p in PROMPTS]
    figures: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
                                " (shared with other jobs while measured)",
                     "date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M-Instruct fp32",
                     "batch": args.batch, "new_tokens": args.new_tokens, "virtual_tokens": 16}
    for name, path in paths.items():
        adapter = engine.load(name, inspect(path))
        rows = [Row(adapter, texts[k % len(texts)], max_tokens=args.new_tokens) for k in range(args.batch)]
        answers = {}
        for way in ("recomputed", "cached"):
            engine.batcher.recompute_prompts = way == "recomputed"
            started = time.perf_counter()
            results = engine.generate(rows)
            seconds = time.perf_counter() - started
            tokens = sum(r["completion_tokens"] for r in results)
            answers[way] = [r["text"] for r in results]
            figures[f"{name}_{way}"] = {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds}
            print(json.dumps({f"{name}_{way}": figures[f"{name}_{way}"]}), flush=True)
        engine.batcher.recompute_prompts = False
        figures[f"{name}_same_answers"] = answers["recomputed"] == answers["cached"]
        figures[f"{name}_cached_over_recomputed"] = (figures[f"{name}_cached"]["tokens_per_s"]
                                                     / figures[f"{name}_recomputed"]["tokens_per_s"])
        engine.unload(adapter)
    print(json.dumps({k: v for k, v in figures.items() if "_over_" in k or "_same_" in k}, indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve-12-prompt-learning.json").write_text(json.dumps(figures, indent=2))
    print(f"wrote {out_dir / 'serve-12-prompt-learning.json'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64, help="requests per throughput setting")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--naive-requests", type=int, default=16)
    parser.add_argument("--engine", action="store_true", help="issue #12 (d): engine tokens/s, gathered vs PEFT")
    parser.add_argument("--poisson", type=int, default=0, help="issue #12 (e)+(f): requests per Poisson run")
    parser.add_argument("--rate", type=float, default=4.0, help="offered load (req/s) of the Poisson runs")
    parser.add_argument("--new-tokens", type=int, default=24, help="(d): new tokens per row")
    parser.add_argument("--rounds", type=int, default=2, help="(d): batches per setting")
    parser.add_argument("--counts", default="1,10,100", help="(d): distinct adapters resident, comma-separated")
    parser.add_argument("--prompt-learning", action="store_true",
                        help="issue #12 (g): prompt/prefix-tuning rows, cached vs recomputed")
    parser.add_argument("--batch", type=int, default=8, help="(g): requests in the batch")
    args = parser.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(2)
    if args.prompt_learning:
        return prompt_learning_throughput(args)
    if args.engine or args.poisson:
        return issue12(args)
    out_dir = REPO / "bench" / "results"
    adapters = make_adapters(out_dir / "serve-adapters", 100)
    figures = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M-Instruct fp32",
               "new_tokens": NEW_TOKENS}
    figures.update(engine_figures(adapters))
    print(json.dumps({k: figures[k] for k in ("hot_load", "rss")}, indent=2), flush=True)
    gc.collect()
    figures["naive"] = naive_baseline(adapters, args.naive_requests)
    print(json.dumps({"naive": figures["naive"]}), flush=True)
    figures["http"] = server_figures(adapters, args.requests, args.concurrency)
    http, naive = figures["http"], figures["naive"]["req_per_s"]
    figures["ratios"] = {
        "mixed_over_single_10": http["mixed_10"]["req_per_s"] / http["single_1_of_10"]["req_per_s"],
        **{f"mixed_{n}_over_naive": http[f"mixed_{n}"]["req_per_s"] / naive for n in (1, 10, 100)},
        "hot_load_p50_100_over_1": figures["hot_load"]["100"]["p50_ms"] / figures["hot_load"]["1"]["p50_ms"],
    }
    print(json.dumps({"ratios": figures["ratios"]}, indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve.json").write_text(json.dumps(figures, indent=2))
    print(f"wrote {out_dir / 'serve.json'}")


if __name__ == "__main__":
    main()
