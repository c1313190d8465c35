"""`onebase deploy`: put a Ray Serve config (the `serve deploy` YAML) on a cluster and wait for it.

The config goes through the dashboard's REST API (PUT /api/serve/applications/, what `serve deploy`
does), so the command needs only the dashboard address. The config is declarative: it replaces every
application running on the cluster's Serve. `--env KEY=VALUE` adds runtime_env env_vars to every
application (MLFLOW_TRACKING_URI, ONEBASE_API_KEYS, ...); note that the dashboard shows them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from onebase.cluster.submit import call, connect, parse_env
from onebase.errors import ClusterError, SpecError, error_line
from onebase.spec.load import describe, read_yaml

FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}


def load_config(path: str | Path, env: list[str] | None = None) -> dict[str, Any]:
    """Read and check a Serve config with Ray's own schema; SpecError in one line when it is wrong."""
    path = Path(path)
    config = read_yaml(path, missing=f"serve config not found: {path}")
    if not isinstance(config, dict) or not config.get("applications"):
        raise SpecError(f"{path}: a Serve config is a mapping with a non-empty applications: list")
    env_vars = parse_env(env or [])
    for app in config["applications"]:
        if isinstance(app, dict) and env_vars:
            runtime_env = app.setdefault("runtime_env", {}) or {}
            app["runtime_env"] = runtime_env
            runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env_vars}
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        raise SpecError(f"{path}: {describe(err)}") from None
    return config


def serve_client(address: str | None):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return connect(ServeSubmissionClient, address, "the Ray dashboard's Serve API")


def one_line(message: str | None) -> str:
    """The telling line of a Serve status message (often a traceback): its last error line."""
    errors = [line for line in (message or "").splitlines()
              if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]]
    return error_line("\n".join(errors) or message, last=True, limit=500)


def endpoints(details: dict[str, Any], address: str, names: list[str] | None = None) -> dict[str, str]:
    """app name -> http://host:port/route for the apps with a route prefix."""
    http = details.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = urlsplit(address).hostname or "127.0.0.1"
    port = http.get("port", 8000)
    out = {}
    for name, app in (details.get("applications") or {}).items():
        if (names is None or name in names) and app.get("route_prefix"):
            out[name] = f"http://{host}:{port}{app['route_prefix']}"
    return out


def deploy(config_path: str | Path, address: str | None = None, env: list[str] | None = None,
           timeout: float = 600, echo=print) -> dict[str, str]:
    """Deploy and wait until every application in the config is RUNNING; returns their endpoints."""
    config = load_config(config_path, env)  # before contacting the cluster
    names = [app.get("name", "default") for app in config["applications"]]
    client = serve_client(address)
    before = call(client, "serve status", None, client.get_serve_details)
    previous = {name: (app or {}).get("last_deployed_time_s")
                for name, app in (before.get("applications") or {}).items()}
    call(client, "serve deploy", None, client.deploy_applications, config)
    echo(f"deploying {', '.join(names)} to {client.get_address()} ...", file=sys.stderr)
    started = time.monotonic()
    deadline = started + timeout
    shown: dict[str, str] = {}
    while True:
        details = call(client, "serve status", None, client.get_serve_details)
        apps = details.get("applications") or {}
        ready = []
        for name in names:
            app = apps.get(name)
            if not app:
                continue
            status = app.get("status")
            fresh = name not in previous or app.get("last_deployed_time_s") != previous[name] \
                or time.monotonic() - started > 15  # an unchanged config is not redeployed
            if not fresh:
                continue
            if status in FAILED:
                raise ClusterError(f"deploy: application {name}: {status}: {one_line(app.get('message'))}")
            if status != shown.get(name):
                echo(f"  {name}: {status}", file=sys.stderr)
                shown[name] = status
            if status == "RUNNING":
                ready.append(name)
        if len(ready) == len(names):
            break
        if time.monotonic() > deadline:
            waiting = {n: (apps.get(n) or {}).get("status", "not started") for n in names if n not in ready}
            raise ClusterError(f"deploy: not RUNNING after {timeout:.0f} s: {waiting}")
        time.sleep(2)
    urls = endpoints(details, client.get_address(), names)
    for name in names:
        echo(f"{name}: RUNNING at {urls.get(name, '(no route prefix)')}")
    return urls


def show_status(address: str | None = None, out=sys.stdout) -> dict[str, Any]:
    client = serve_client(address)
    details = call(client, "serve status", None, client.get_serve_details)
    apps = details.get("applications") or {}
    if not apps:
        print(f"no Serve applications on {client.get_address()}", file=out)
    urls = endpoints(details, client.get_address())
    for name, app in apps.items():
        print(f"{name}: {app.get('status')} at {urls.get(name, '-')}", file=out)
        if app.get("status") != "RUNNING" and app.get("message"):
            print(f"  message: {one_line(app['message'])}", file=out)
        for dep_name, dep in (app.get("deployments") or {}).items():
            replicas = dep.get("replicas") or []
            print(f"  {dep_name}: {dep.get('status')} ({len(replicas)} replica(s))", file=out)
    return details


def delete(address: str | None = None, timeout: float = 120, out=sys.stdout) -> None:
    client = serve_client(address)
    call(client, "serve delete", None, client.delete_applications)
    deadline = time.monotonic() + timeout
    while (call(client, "serve status", None, client.get_serve_details).get("applications") or {}):
        if time.monotonic() > deadline:
            raise ClusterError(f"serve delete: applications still present after {timeout:.0f} s")
        time.sleep(1)
    print(f"deleted every Serve application on {client.get_address()}", file=out)
