"""Serving benchmark (issue #4): SmolLM2-135M-Instruct (fp32, 2 threads), 100 LoRA adapters (r=8, q/v).

(a) throughput through the real HTTP server with 1, 10 and 100 adapters resident, a uniformly random
    adapter per request, concurrent clients; a single-adapter run for the mixed/single ratio; and the
    naive baseline (plain PEFT, one request at a time, `set_adapter` per request, 10 adapters).
(b) hot-load latency p50/p95 with 1, 10 and 100 adapters already resident (the replica's load path).
(c) RSS growth for 100 adapters vs the bytes of their tensors, and vs 100 separate model copies.

    .venv/bin/python bench/serve.py                 # ~5 min on 2 cores
    .venv/bin/python bench/serve.py --requests 32   # quicker, noisier
Prints and writes bench/results/serve.json.
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


def server_figures(adapters: list[Path], requests_total: int, concurrency: int) -> dict:
    import requests
    from ray import serve

    from onebase.serve.app import build
    from onebase.train.launch import connect_ray

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="obbench-", dir="/tmp"))
    connect_ray(None)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"bases": [{"name": "smollm2-135m-instruct", "alias": "smollm2", "threads": 2, "cpus": 1,
                       "max_adapters": 128, "max_batch_size": 16, "batch_wait_ms": BATCH_WAIT_MS}],
            "auth": {"admin_token": "bench"}, "limits": {"max_tokens": NEW_TOKENS}}
    serve.run(build(args), name="onebase", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    admin = {"Authorization": "Bearer bench"}
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=60).ok:
                break
        except requests.RequestException:
            time.sleep(1)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64, help="requests per throughput setting")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--naive-requests", type=int, default=16)
    args = parser.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(2)
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
