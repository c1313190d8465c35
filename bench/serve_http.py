"""Issue #12 (e), where the HTTP path's time goes. One Poisson request mix (bench/serve.py's: streamed chat
requests, `max_tokens` drawn from 4-64, a random adapter of the resident set each) served three ways,
side by side in one run:

1. naive, in-process: plain PEFT, one request at a time, `set_adapter` per request (bench/serve.py's
   baseline: no HTTP at all);
2. the real server (one replica, `--threads` torch threads, 1 by default), continuous batching, its default
   32 rows and prefix cache (and once more without the prefix cache);
3. the same server, one row at a time (`max_batch_size: 1`): naive serving behind the same HTTP stack,
   so the ratio of 2 to 3 is what batching gains once both pay for HTTP;
4. the replica's engine in this process, no HTTP: the same arrivals replayed into its continuous
   batcher (same rows, same prefix cache), so the ratio of 2 to 4 is what the HTTP path and the
   processes beside the replica cost.

`--prefill-thread-off` adds the batched server and the in-process engine once more with the replica's
prefill thread off (`prefill_thread: false`: prefill on the decoding thread between decode steps), and
`--plain-weights` once more without packed weights (`packed_weights: false`), so each ratio is what that
option adds.

For the server rows, the CPU seconds each process spent during the load (the replica, the gateway, Serve's
proxy and controller, the catalog, Ray's daemons, and this script's own client threads), read from /proc
before and after: on a 2-core machine the clients, the proxy and the gateway take their CPU from the
replica.

    .venv/bin/python bench/serve_http.py --requests 64 --rate 4 --adapters 10      # ~9 min on 2 cores
    .venv/bin/python bench/serve_http.py --requests 128 --rate 8 --adapters 100 --no-one-at-a-time --dtype bfloat16
    .venv/bin/python bench/serve_http.py --requests 128 --rate 8 --adapters 100 --no-one-at-a-time --no-cache-off \
        --dtype bfloat16 --prefill-thread-off --plain-weights                     # ~9 min
Prints and writes bench/results/serve-http.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from figures import header, save  # noqa: E402
from serve import make_adapters, naive_mixed, poisson_load, request_mix, start_server  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
# Process title fragment -> role. Ray names its worker processes after the actor they host.
ROLES = (("ServeReplica:onebase:Gateway", "gateway"), ("ServeReplica:onebase:base-", "replica"),
         ("ServeReplica:onebase:Catalog", "catalog"), ("ProxyActor", "proxy"), ("ServeController", "controller"),
         ("raylet", "ray daemons"), ("gcs_server", "ray daemons"), ("dashboard", "ray daemons"),
         ("log_monitor", "ray daemons"), ("ray::", "other ray workers"))


def role_of(pid: int) -> str | None:
    if pid == os.getpid():
        return "load generator (this script's clients)"
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return next((role for fragment, role in ROLES if fragment in title), None)


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (role, user + system CPU seconds so far) for every process this benchmark cares about."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (role := role_of(int(entry.name))) is None:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry.name)] = (role, (int(fields[11]) + int(fields[12])) / TICKS)  # utime, stime
    return out


def cpu_split(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role spent between the two snapshots (processes started meanwhile count from 0)."""
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        spent[role] = spent.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return {role: round(value, 1) for role, value in sorted(spent.items(), key=lambda kv: -kv[1])}


def served(adapters: list[Path], mix: list, rate: float, max_batch_size: int, prefix_cache_tokens: int,
           threads: int, dtype: str, engine_options: dict | None = None) -> dict:
    """Load the adapters through the admin API, then the Poisson mix; its figures and CPU split."""
    import requests
    from ray import serve

    base = {"max_queue": 256, "max_batch_size": max_batch_size, "dtype": dtype, **(engine_options or {})}
    url = start_server(base, 256,
                       limits={"prefix_cache_tokens": prefix_cache_tokens}, threads=threads)
    try:
        names = []
        for i, path in enumerate(adapters):
            names.append(f"adapter{i:03d}")
            requests.post(f"{url}/admin/adapters", headers={"Authorization": "Bearer bench"}, timeout=300,
                          json={"id": names[-1], "source": str(path)}).raise_for_status()
        before, began = cpu_seconds(), time.perf_counter()
        figures = poisson_load(url, names, mix, rate)
        wall = time.perf_counter() - began
        figures["cpu_s"] = cpu_split(before, cpu_seconds())
        figures["cpu_busy_fraction_of_2_cores"] = round(sum(figures["cpu_s"].values()) / (2 * wall), 2)
        figures["tokens_per_s"] = figures["tokens"] / figures["seconds"]
        figures["server"] = {"max_batch_size": max_batch_size, "prefix_cache_tokens": prefix_cache_tokens,
                             "threads": threads, "dtype": dtype, **(engine_options or {})}
        decoding = requests.get(f"{url}/admin/adapters", headers={"Authorization": "Bearer bench"},
                                timeout=60).json()["decoding_on_a_replica"]
        figures["prefix_cache"] = next(iter(decoding.values()))["prefix_cache"]
        return figures
    finally:
        serve.shutdown()


def engine_replay(adapters: list[Path], mix: list, rate: float, max_rows: int, prefix_cache_tokens: int,
                  threads: int, dtype: str, prefill_thread: bool = True, packed_weights: bool = True) -> dict:
    """The mix's arrivals (poisson_load's seed) submitted into a replica's engine in this process, one
    thread stepping it as the replica's scheduler does (and its prefill thread, as the replica's);
    where the time goes (decode steps, prefill forwards: with a prefill thread these overlap)."""
    import random
    import threading

    from onebase.serve import decode
    from onebase.serve.engine import BaseEngine, Row, load_path
    from onebase.serve.prefix_cache import PrefixCache

    engine = BaseEngine("smollm2-135m-instruct", threads=threads, dtype=dtype, packed_weights=packed_weights)
    loaded = [engine.load(f"adapter{i:03d}", load_path(p)) for i, p in enumerate(adapters)]
    engine.batcher.prefix = PrefixCache(prefix_cache_tokens)
    if prefill_thread:
        engine.batcher.prefill_thread()
    seqs: list = []
    spent = {"decode_s": 0.0, "prefill_s": 0.0}

    def timed(method, key):
        def run(*args):
            began = time.perf_counter()
            result = method(*args)
            spent[key] += time.perf_counter() - began
            return result
        return run

    original = decode._Batch.decode, decode._Batch.prefill
    decode._Batch.decode, decode._Batch.prefill = timed(original[0], "decode_s"), timed(original[1], "prefill_s")

    def arrivals() -> None:
        rng = random.Random(3)  # poisson_load's
        for draw, prompt, max_tokens in mix:
            time.sleep(rng.expovariate(rate))
            adapter = loaded[draw % len(loaded)]
            text = engine.render_chat([{"role": "user", "content": prompt}], adapter)
            seqs.append(engine.batcher.submit(engine.sequence(Row(adapter, text, max_tokens=max_tokens))))

    try:
        feeder = threading.Thread(target=arrivals)
        began = time.perf_counter()
        feeder.start()
        while feeder.is_alive() or not all(s.done.is_set() for s in seqs):
            if engine.batcher.pending():
                engine.batcher.step(max_rows)
            else:
                time.sleep(0.002)
        seconds = time.perf_counter() - began
    finally:
        decode._Batch.decode, decode._Batch.prefill = original
    tokens = sum(len(s.tokens) for s in seqs)
    return {"requests": len(seqs), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "req_per_s": len(seqs) / seconds, **{k: round(v, 1) for k, v in spent.items()},
            "prefix_cache": engine.batcher.prefix.summary()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64, help="requests in the Poisson mix (server rows)")
    parser.add_argument("--naive-requests", type=int, default=16, help="the first N of the mix, in-process")
    parser.add_argument("--rate", type=float, default=4.0, help="offered load, req/s")
    parser.add_argument("--adapters", type=int, default=10)
    # 1: the replica reserves one CPU (`cpus: 1`), and a replica without `threads` gets as many torch threads
    # as CPUs it reserves; 2 oversubscribes the 2 cores the HTTP side shares (docs/benchmarks.md #12 (e5)).
    parser.add_argument("--threads", type=int, default=1,
                        help="the replica's torch threads (and the in-process engine's); naive always runs with 2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the base's dtype, for the naive baseline, the server and the in-process engine alike")
    parser.add_argument("--out", default="serve-http", help="bench/results/<out>.json")
    parser.add_argument("--no-one-at-a-time", action="store_true",
                        help="skip the one-row server (minutes at high loads: it serves the whole mix one by one)")
    parser.add_argument("--no-cache-off", action="store_true",
                        help="skip the batched server with its prefix cache off (what the cache adds)")
    parser.add_argument("--prefill-thread-off", action="store_true",
                        help="also serve (and replay in-process) with the replica's prefill thread off: what it adds")
    parser.add_argument("--plain-weights", action="store_true",
                        help="also serve (and replay in-process) without packed weights (`packed_weights: false`)")
    parser.add_argument("--rows", type=int, default=32, help="the batched server's max_batch_size (its default)")
    parser.add_argument("--prefix-cache-tokens", type=int, default=2048,
                        help="the server's limits.prefix_cache_tokens (its default; 0: off)")
    args = parser.parse_args()
    os.chdir(REPO)
    import torch

    torch.set_num_threads(2)
    adapters = make_adapters(REPO / "bench" / "results" / "serve-adapters", max(args.adapters, 100))[: args.adapters]
    mix = request_mix(args.requests, seed=4)
    out = {**header(), "model": f"SmolLM2-135M-Instruct {args.dtype}", "adapters": args.adapters, "rate": args.rate}
    out["naive_in_process"] = naive_mixed(adapters, mix[: args.naive_requests], args.adapters, args.dtype)
    print(json.dumps({"naive_in_process": out["naive_in_process"]}), flush=True)
    gc.collect()
    prefix = args.prefix_cache_tokens
    # Each variant is the defaults with one engine option off: what that option adds, same server otherwise.
    variants = {"": {}, **({"_no_prefill_thread": {"prefill_thread": False}} if args.prefill_thread_off else {}),
                **({"_plain_weights": {"packed_weights": False}} if args.plain_weights else {})}
    runs = [("server_batched", args.rows, prefix, {})] + ([] if args.no_one_at_a_time else
                                                           [("server_one_at_a_time", 1, prefix, {})])
    if args.prefix_cache_tokens and not args.no_cache_off:  # what the prefix cache adds, same server otherwise
        runs.append(("server_batched_no_prefix_cache", args.rows, 0, {}))
    runs += [(f"server_batched{suffix}", args.rows, prefix, options) for suffix, options in variants.items() if suffix]
    for name, rows, prefix_tokens, options in runs:
        out[name] = served(adapters, mix, args.rate, rows, prefix_tokens, args.threads, args.dtype, options)
        print(json.dumps({name: out[name]}), flush=True)
    for suffix, options in variants.items():
        name = f"engine_in_process{suffix}"
        out[name] = engine_replay(adapters, mix, args.rate, args.rows, args.prefix_cache_tokens, args.threads,
                                  args.dtype, **options)
        print(json.dumps({name: out[name]}), flush=True)
    torch.set_num_threads(2)  # the naive baseline's, as at the start
    # Measured again at the end: a baseline slowed by a passing load would flatter every ratio; the faster
    # of the two is the one the ratios use.
    out["naive_in_process_again"] = naive_mixed(adapters, mix[: args.naive_requests], args.adapters, args.dtype)
    print(json.dumps({"naive_in_process_again": out["naive_in_process_again"]}), flush=True)
    naive_tps = max(out["naive_in_process"]["tokens_per_s"], out["naive_in_process_again"]["tokens_per_s"])
    naive_rps = max(out["naive_in_process"]["req_per_s"], out["naive_in_process_again"]["req_per_s"])
    out["ratios"] = {
        "batched_over_naive_in_process_tokens": out["server_batched"]["tokens_per_s"] / naive_tps,
        "batched_over_naive_in_process_requests": out["server_batched"]["req_per_s"] / naive_rps,
        **({"batched_over_one_at_a_time_tokens": out["server_batched"]["tokens_per_s"]
            / out["server_one_at_a_time"]["tokens_per_s"],
            "one_at_a_time_over_naive_in_process_tokens": out["server_one_at_a_time"]["tokens_per_s"] / naive_tps}
           if "server_one_at_a_time" in out else {}),
        **({"batched_over_batched_without_prefix_cache_tokens": out["server_batched"]["tokens_per_s"]
            / out[cache_off]["tokens_per_s"]} if (cache_off := "server_batched_no_prefix_cache") in out else {}),
        "engine_in_process_over_naive_in_process_tokens": out["engine_in_process"]["tokens_per_s"] / naive_tps,
        "batched_over_engine_in_process_tokens": out["server_batched"]["tokens_per_s"]
        / out["engine_in_process"]["tokens_per_s"],
    }
    for suffix in (s for s in variants if s):  # each engine option against the defaults
        server = out[f"server_batched{suffix}"]["tokens_per_s"]
        engine = out[f"engine_in_process{suffix}"]["tokens_per_s"]
        out["ratios"][f"batched_over_batched{suffix}_tokens"] = out["server_batched"]["tokens_per_s"] / server
        out["ratios"][f"batched{suffix}_over_naive_in_process_tokens"] = server / naive_tps
        out["ratios"][f"engine_over_engine{suffix}_tokens"] = out["engine_in_process"]["tokens_per_s"] / engine
    save(args.out, out)


if __name__ == "__main__":
    main()
