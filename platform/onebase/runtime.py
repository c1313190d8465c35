"""What every Ray-using command shares: connecting to Ray, the cluster's room for workers, free
ports on 127.0.0.1, and the one-line form of an error.

Training, sweeps, prompt programs, serving and the local stack all use this module; it imports
nothing of theirs (only `errors` and the spec's types), so none of them has to import another to
reach Ray. What only Ray Train needs (its env vars, the pinned ninja) is added by
`onebase.train.launch.connect_ray`, not here.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from onebase.errors import ClusterError, root_cause

if TYPE_CHECKING:  # annotations only: the spec layer stays out of this module's imports
    from onebase.spec.schema import JobSpec

DASHBOARD_URL: str | None = None  # of the Ray this process connected to
# Defaults of Ray, Ray Serve and MLflow: never picked, so a default Ray beside us keeps its ports.
RESERVED_PORTS = {5000, 6379, 8000, 8076, 8077, 8080, 8265, 9000, 10001, 44217, 44227, 52365, 52366, 62365}
RAY_REACH_TIMEOUT_S = 5.0  # a TCP connect to a cluster's address; Ray's own wait is ~14 min


def connect_ray(address: str | None, quiet: bool = False, env: dict[str, str] | None = None) -> str | None:
    """Join `address` or start a fresh local Ray; returns its dashboard URL (None when it has none).

    `quiet`: workers' output stays in Ray's log files and only errors of Ray's own are shown, so the
    console holds the progress bar and results (`onebase run` without --verbose). `env`: more env
    vars for this process and every Ray worker (the caller's own needs, e.g. Ray Train's)."""
    import ray

    global DASHBOARD_URL
    if ray.is_initialized():
        return DASHBOARD_URL
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        # Keep the terminal readable: library deprecation chatter would bury the progress lines.
        "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning"),
        **(env or {}),
    }
    env.update({k: v for k, v in os.environ.items() if k.startswith("ONEBASE_CACHE")})
    os.environ.update(env)  # e.g. the Train controller runs in this job's processes too
    # No address: a fresh local Ray, never whichever cluster `ray start` left on this machine.
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    check_ray_address(target, "--address" if address else "RAY_ADDRESS")
    init_args, state_api = pin_state_api(target)
    if quiet:
        quiet_driver_loggers()
    # A fresh local Ray's processes inherit this process's environment: no job-wide runtime env, so
    # actors without one of their own start on the workers Ray prestarts (one process start less
    # each). A cluster's workers only get the variables through the runtime env.
    runtime_env = None if target == "local" else {"env_vars": {**env, **state_api}}
    try:
        with scoped_environ(state_api if target == "local" else {}):
            context = ray.init(address=target, runtime_env=runtime_env, log_to_driver=not quiet,
                               configure_logging=True, logging_level="ERROR" if quiet else "WARNING", **init_args)
    except ConnectionError as err:
        raise ClusterError(f"--address {address}: cannot connect to a Ray cluster ({root_cause(err)})") from None
    url = getattr(context, "dashboard_url", None)
    DASHBOARD_URL = (url if "://" in url else f"http://{url}") if url else None
    return DASHBOARD_URL


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ only while the block runs: the Ray it starts inherits them, while this
    process (and whatever it starts later, e.g. another onebase command) does not keep them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_ray_address(address: str, source: str = "--address") -> None:
    """A Ray address nothing answers at fails here, at once, in one line.

    `ray.init` keeps retrying such an address for ~14 min (20 tries of ~40 s, C++ warnings on the
    console); a plain TCP connection to the same host:port tells within RAY_REACH_TIMEOUT_S. `local`
    and `auto` are left to Ray: it finds (or starts) those instances itself and fails fast when none."""
    if address in ("local", "auto"):
        return
    if "://" in address and not address.startswith("ray://"):
        raise ClusterError(f"{source} {address}: not a Ray address; give the head's host:port (its GCS, "
                           "e.g. 127.0.0.1:6379), ray://host:10001 or auto (a dashboard URL is for onebase submit)")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"{source} {address}: expected host:port (e.g. 127.0.0.1:6379) or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_REACH_TIMEOUT_S):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise ClusterError(f"{source} {address}: no Ray cluster answers at {host}:{port} ({reason})") from None


def quiet_driver_loggers() -> None:
    """MLflow's store set-up and Ray Train's driver-side INFO lines: kept for --verbose."""
    import logging

    import mlflow  # noqa: F401 - mlflow sets its loggers' level when first imported: import it first

    for name in ("mlflow", "alembic", "ray", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def pin_state_api(address: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Point Ray's own state-API calls at this job's Ray instance (ray.init args, worker env vars).

    Ray Train's placement-group cleaner finds "the" local Ray instance by scanning processes; with a
    second instance on the machine (a local stack, a Serve app) it crashes, and every early-stopped
    sweep trial then keeps its CPUs for good: the next trials wait forever for a worker group.
    """
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return {}, {}
    if address == "local":  # a fresh instance: fix its dashboard port, then name it
        port = free_port(set())
        return {"dashboard_port": port}, {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    if address == "auto" or "://" in address:  # Ray resolves these itself (one instance, or Ray Client)
        return {}, {}
    return {}, {"RAY_ADDRESS": address}  # a GCS address: the state API asks that GCS for its dashboard


def worker_resources(spec: JobSpec) -> dict[str, float]:
    """What one training worker of `spec` asks Ray for."""
    need = dict(spec.scaling.resources_per_worker)
    if spec.scaling.use_gpu:
        need.setdefault("GPU", 1)
    return need


def worker_slots(spec: JobSpec) -> int:
    """How many of this job's workers the cluster's live nodes can hold at once."""
    import ray

    need = worker_resources(spec)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return sum(min((int(node.get(k, 0) // v) if v else 10**9) for k, v in need.items()) if need else 10**9
               for node in nodes)


def check_resources(spec: JobSpec) -> None:
    """Ray waits forever for resources that do not exist: refuse impossible requests up front."""
    import ray

    need, fits = worker_resources(spec), worker_slots(spec)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if fits < spec.scaling.num_workers:
        total = ray.cluster_resources()
        have = ", ".join(f"{k}={total.get(k, 0):g}" for k in need)
        raise ClusterError(f"scaling: {spec.scaling.num_workers} workers x {need} do not fit the cluster "
                           f"({have} over {len(nodes)} node(s); room for {fits} worker(s))")


def free_port(taken: set[int] | None = None) -> int:
    """A port free on 127.0.0.1 now, not in `taken` (which it joins) nor a default of Ray or MLflow."""
    taken = set() if taken is None else taken
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken and port not in RESERVED_PORTS:
            taken.add(port)
            return port
    raise ClusterError("no free port on 127.0.0.1")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
