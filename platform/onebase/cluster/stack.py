"""A local cluster on 127.0.0.1: a Ray head, a second Ray node joined to it, and an MLflow server.

    python -m onebase.cluster.stack start [--dir .onebase/stack] [--cpus 2] [--worker-cpus 2]
    python -m onebase.cluster.stack status|stop [--dir .onebase/stack]

(`infra/local-stack.sh` wraps this.) Every port is picked free at start, away from Ray's and
MLflow's defaults, so the stack runs beside another Ray on the same machine; everything lives in
the state dir (`stack.json`, logs, `mlflow.db`, `mlartifacts/`) plus a short Ray temp dir in /tmp.

`ray stop` would stop every Ray on the machine, so `stop` does not use it: each node runs as
`ray start --block` in its own session and is stopped by its pid (it takes its node's processes
down with it); then whatever still carries this stack's marker in its environment (Ray workers,
job drivers, the MLflow server's workers) is terminated by pid, and `stop` checks nothing is left.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from onebase.errors import ClusterError
from onebase.runtime import free_port, port_free  # noqa: F401 - port_free: still importable from here

STATE_FILE = "stack.json"
DEFAULT_DIR = ".onebase/stack"
MARK = "ONEBASE_STACK_ID"  # set in every process of the stack: how `stop` finds them all
DEFAULT_WORKER_PORTS = range(10002, 20000)  # Ray's default worker port range
WORKER_PORT_SPAN = 100


def free_range(taken: set[int], span: int = WORKER_PORT_SPAN) -> tuple[int, int]:
    """A block of free ports for Ray workers, below the ephemeral range and above Ray's default block."""
    for _ in range(100):
        low = random.randrange(20000, 32000 - span)
        block = range(low, low + span)
        if not taken.intersection(block) and all(port_free(p) for p in block):
            taken.update(block)
            return low, low + span - 1
    raise ClusterError("no free block of worker ports in 20000-32000")


def executable(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the same virtual environment as this Python
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise ClusterError(f"{name}: not installed (install onebase into this environment first)")
    return found


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def read_state(state_dir: Path) -> dict[str, Any] | None:
    path = Path(state_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stack_pids(stack_id: str) -> list[int]:
    """Live processes of this user that carry the stack's marker in their environment."""
    needle = f"{MARK}={stack_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for(what: str, check, proc: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{what} exited with code {proc.returncode} (log: {log}):\n{log_tail(log)}")
        time.sleep(0.5)
    raise ClusterError(f"{what} not ready after {timeout:.0f} s (log: {log}):\n{log_tail(log)}")


def alive_nodes(dashboard: str) -> int:
    try:
        data = http_json(f"{dashboard}/nodes?view=summary")
    except (OSError, ValueError):
        return 0
    summary = (data.get("data") or {}).get("summary") or []
    return sum(1 for node in summary if (node.get("raylet") or {}).get("state") == "ALIVE")


def node_ports(taken: set[int]) -> list[str]:
    low, high = free_range(taken)
    return ["--node-manager-port", str(free_port(taken)), "--object-manager-port", str(free_port(taken)),
            "--min-worker-port", str(low), "--max-worker-port", str(high),
            "--dashboard-agent-listen-port", str(free_port(taken)),
            "--dashboard-agent-grpc-port", str(free_port(taken)),
            "--runtime-env-agent-port", str(free_port(taken)), "--metrics-export-port", str(free_port(taken))]


def start(state_dir: str | Path = DEFAULT_DIR, cpus: int = 2, worker_cpus: int = 2, object_store_mb: int = 512,
          timeout: float = 180, echo=print) -> dict[str, Any]:
    """Start the stack; returns its state (addresses, pids), also written to <state_dir>/stack.json."""
    state_dir = Path(state_dir).resolve()
    previous = read_state(state_dir)
    if previous and any(alive(p) for p in previous.get("pids", {}).values()):
        raise ClusterError(f"a stack is already running from {state_dir} (ray {previous['ray_address']}); "
                           f"stop it first")
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    ray, mlflow = executable("ray"), executable("mlflow")

    taken: set[int] = set()
    gcs, dashboard_port, client_port, mlflow_port, autoscaler_metrics, dashboard_metrics = (
        free_port(taken) for _ in range(6))
    stack_id = uuid.uuid4().hex[:12]
    # Ray's socket paths must stay under 107 bytes: a short temp dir, not one under the state dir.
    temp_dir = tempfile.mkdtemp(prefix=f"obs-{stack_id[:6]}-", dir="/tmp")
    state: dict[str, Any] = {
        "id": stack_id, "state_dir": str(state_dir), "temp_dir": temp_dir, "started": time.time(),
        "ray_address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "mlflow": f"http://127.0.0.1:{mlflow_port}", "ports": {"gcs": gcs, "dashboard": dashboard_port,
                                                                 "client": client_port, "mlflow": mlflow_port},
        "pids": {},
    }
    env = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}
    env.update({MARK: stack_id, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "MLFLOW_TRACKING_URI": state["mlflow"], "RAY_USAGE_STATS_ENABLED": "0",
                # A loopback dev stack: no Ray token auth, whatever ~/.ray/auth_token an earlier local
                # ray.init left behind (Ray turns token auth on when that file exists).
                "RAY_AUTH_MODE": "disabled",
                # Processes that look for "the" local cluster (Ray Train's placement-group cleaner uses
                # the state API) would find several when another Ray runs on this machine: name ours.
                "RAY_ADDRESS": state["ray_address"],
                # Fixed by default (44217, 44227): a second Ray head on the machine would collide.
                "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics), "DASHBOARD_METRIC_PORT": str(dashboard_metrics)})
    env.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

    def save() -> None:
        (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    common = ["--block", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(object_store_mb << 20),
              "--disable-usage-stats"]
    try:
        head_log, worker_log, mlflow_log = logs / "ray-head.log", logs / "ray-worker.log", logs / "mlflow.log"
        mlflow_proc = spawn([mlflow, "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
                             "--artifacts-destination", str(state_dir / "mlartifacts"), "--serve-artifacts"],
                            mlflow_log, env)
        state["pids"]["mlflow"] = mlflow_proc.pid
        head = spawn([ray, "start", "--head", *common, "--port", str(gcs), "--num-cpus", str(cpus),
                      "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                      "--ray-client-server-port", str(client_port), "--temp-dir", f"{temp_dir}/h", *node_ports(taken)],
                     head_log, env)
        state["pids"]["ray_head"] = head.pid
        save()
        wait_for("ray head", lambda: http_ok(f"{state['dashboard']}/api/version"), head, head_log, timeout)
        # Its own temp dir: sharing the head's, each node's log monitor would forward every worker's
        # output, and job logs would show each line twice.
        worker = spawn([ray, "start", "--address", state["ray_address"], *common, "--num-cpus", str(worker_cpus),
                        "--temp-dir", f"{temp_dir}/w", *node_ports(taken)], worker_log, env)
        state["pids"]["ray_worker"] = worker.pid
        save()
        wait_for("second ray node", lambda: alive_nodes(state["dashboard"]) >= 2, worker, worker_log, timeout)
        wait_for("mlflow server", lambda: http_ok(f"{state['mlflow']}/health"), mlflow_proc, mlflow_log, timeout)
    except BaseException:
        save()
        stop(state_dir, echo=lambda *_: None, keep_temp=True)  # Ray's own logs stay for a look
        raise
    save()
    echo(describe(state))
    return state


def describe(state: dict[str, Any]) -> str:
    return "\n".join([
        f"ray address:   {state['ray_address']}   (ray.init / onebase run --address)",
        f"jobs/dashboard: {state['dashboard']}   (onebase submit|jobs|deploy --address)",
        f"mlflow:        {state['mlflow']}   (--tracking-uri; the nodes have MLFLOW_TRACKING_URI set to it)",
        f"state:         {state['state_dir']}",
        f"export RAY_ADDRESS={state['dashboard']} MLFLOW_TRACKING_URI={state['mlflow']}",
    ])


def terminate(pids: list[int], grace: float) -> list[int]:
    """SIGTERM, then SIGKILL after `grace` seconds; returns those still alive afterwards."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if alive(p)]
        if not pids:
            break
    return pids


def stop(state_dir: str | Path = DEFAULT_DIR, echo=print, grace: float = 15, keep_temp: bool = False) -> list[int]:
    """Stop the stack: the worker node, the head, MLflow, then any stray process of this stack.
    Returns the pids still alive afterwards (empty on success)."""
    state_dir = Path(state_dir).resolve()
    state = read_state(state_dir)
    if state is None:
        echo(f"no stack in {state_dir}")
        return []
    pids = state.get("pids", {})
    for name in ("ray_worker", "ray_head", "mlflow"):  # `ray start --block` takes its node down on SIGTERM
        pid = pids.get(name)
        if alive(pid):
            terminate([pid], grace)
    _reap()
    left = terminate(stack_pids(state["id"]), grace)
    _reap()
    if not keep_temp and state.get("temp_dir", "").startswith("/tmp/obs-"):  # Ray's session logs and sockets
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
    state["pids"], state["stopped"] = {}, time.time()
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    if left:
        echo(f"stack {state['id']}: processes still alive: {left}")
    else:
        echo(f"stopped: ray {state['ray_address']}, mlflow {state['mlflow']}")
    return left


def _reap() -> None:
    """Collect exited children of this process (when start and stop run in the same Python)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def status(state_dir: str | Path = DEFAULT_DIR) -> dict[str, Any]:
    state = read_state(Path(state_dir).resolve())
    if state is None:
        return {"running": False, "state_dir": str(Path(state_dir).resolve())}
    pids = state.get("pids", {})
    checks = {name: alive(pid) for name, pid in pids.items()}
    up = bool(pids) and all(checks.values())
    return {**state, "processes": checks, "ray_nodes": alive_nodes(state["dashboard"]) if up else 0,
            "mlflow_ok": http_ok(f"{state['mlflow']}/health") if up else False, "running": up,
            "stack_pids": stack_pids(state["id"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local-stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", default=os.environ.get("ONEBASE_STACK_DIR", DEFAULT_DIR), help="state directory")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the head node")
    parser.add_argument("--worker-cpus", type=int, default=2, help="logical CPUs of the second node")
    parser.add_argument("--json", action="store_true", help="status as JSON")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            start(args.dir, cpus=args.cpus, worker_cpus=args.worker_cpus)
            return 0
        if args.action == "stop":
            return 1 if stop(args.dir) else 0
        info = status(args.dir)
        if args.json:
            print(json.dumps(info, indent=2))
        elif not info.get("id"):
            print(f"no stack in {info['state_dir']}")
        else:
            print(describe(info))
            print(f"running: {info['running']} (processes {info['processes']}, ray nodes alive "
                  f"{info['ray_nodes']}, mlflow {'ok' if info['mlflow_ok'] else 'down'})")
        return 0 if info["running"] else 1
    except ClusterError as err:
        print(f"local-stack: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
