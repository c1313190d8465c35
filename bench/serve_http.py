"""Issue #12 (e), where the HTTP path's time goes. One Poisson request mix (bench/serve.py's: streamed chat
requests, `max_tokens` drawn from 4-64, a random adapter of the resident set each) served three ways,
side by side in one run:

1. naive, in-process: plain PEFT, one request at a time, `set_adapter` per request (bench/serve.py's
   baseline: no HTTP at all);
2. the real server (one replica, 2 threads), continuous batching, up to 16 rows;
3. the same server, one row at a time (`max_batch_size: 1`): naive serving behind the same HTTP stack,
   so the ratio of 2 to 3 is what batching gains once both pay for HTTP.

For the server rows, the CPU seconds each process spent during the load (the replica, the gateway, Serve's
proxy and controller, the catalog, Ray's daemons, and this script's own client threads), read from /proc
before and after: on a 2-core machine the clients, the proxy and the gateway take their CPU from the
replica.

    .venv/bin/python bench/serve_http.py --requests 64 --rate 4 --adapters 10      # ~6 min on 2 cores
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


def served(adapters: list[Path], mix: list, rate: float, max_batch_size: int, prefix_cache_tokens: int) -> dict:
    """Load the adapters through the admin API, then the Poisson mix; its figures and CPU split."""
    import requests
    from ray import serve

    url = start_server({"max_queue": 256, "max_batch_size": max_batch_size}, 256,
                       limits={"prefix_cache_tokens": prefix_cache_tokens})
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
        figures["server"] = {"max_batch_size": max_batch_size, "prefix_cache_tokens": prefix_cache_tokens}
        decoding = requests.get(f"{url}/admin/adapters", headers={"Authorization": "Bearer bench"},
                                timeout=60).json()["decoding_on_a_replica"]
        figures["prefix_cache"] = next(iter(decoding.values()))["prefix_cache"]
        return figures
    finally:
        serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64, help="requests in the Poisson mix (server rows)")
    parser.add_argument("--naive-requests", type=int, default=16, help="the first N of the mix, in-process")
    parser.add_argument("--rate", type=float, default=4.0, help="offered load, req/s")
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument("--rows", type=int, default=32, help="the batched server's max_batch_size (its default)")
    parser.add_argument("--prefix-cache-tokens", type=int, default=2048,
                        help="the server's limits.prefix_cache_tokens (its default; 0: off)")
    args = parser.parse_args()
    os.chdir(REPO)
    import torch

    torch.set_num_threads(2)
    adapters = make_adapters(REPO / "bench" / "results" / "serve-adapters", max(args.adapters, 100))[: args.adapters]
    mix = request_mix(args.requests, seed=4)
    out = {**header(), "model": "SmolLM2-135M-Instruct fp32", "adapters": args.adapters, "rate": args.rate}
    out["naive_in_process"] = naive_mixed(adapters, mix[: args.naive_requests], args.adapters)
    print(json.dumps({"naive_in_process": out["naive_in_process"]}), flush=True)
    gc.collect()
    for name, rows in (("server_batched", args.rows), ("server_one_at_a_time", 1)):
        out[name] = served(adapters, mix, args.rate, rows, args.prefix_cache_tokens)
        print(json.dumps({name: out[name]}), flush=True)
    naive_tps = out["naive_in_process"]["tokens_per_s"]
    out["ratios"] = {
        "batched_over_naive_in_process_tokens": out["server_batched"]["tokens_per_s"] / naive_tps,
        "batched_over_naive_in_process_requests": out["server_batched"]["req_per_s"]
        / out["naive_in_process"]["req_per_s"],
        "batched_over_one_at_a_time_tokens": out["server_batched"]["tokens_per_s"]
        / out["server_one_at_a_time"]["tokens_per_s"],
        "one_at_a_time_over_naive_in_process_tokens": out["server_one_at_a_time"]["tokens_per_s"] / naive_tps,
    }
    save("serve-http", out)


if __name__ == "__main__":
    main()
