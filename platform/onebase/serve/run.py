"""`onebase serve CONFIG`: run the applications of a Serve config file on local Ray or a cluster."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from onebase.errors import SpecError
from onebase.spec.load import describe

IMPORT_PATH = "onebase.serve.app:build"


def read_config(path: str | Path) -> dict[str, Any]:
    """The Serve config (read and checked as `onebase deploy` does), with every application's
    args checked against onebase's own schema: one line per problem, before Ray starts."""
    from onebase.cluster.deploy import load_config
    from onebase.serve.config import ServeArgs

    config = load_config(path)
    for i, app in enumerate(config["applications"]):
        if app.get("import_path") != IMPORT_PATH:
            raise SpecError(f"{path}: applications.{i}.import_path: onebase serves {IMPORT_PATH}")
        try:
            ServeArgs.model_validate(app.get("args") or {})
        except ValidationError as err:
            raise SpecError(f"{path}: applications.{i}.args.{describe(err)}") from None
    return config


def serve_config(path: str | Path, address: str | None = None, host: str | None = None,
                 port: int | None = None, block: bool = True) -> dict[str, Any]:
    config = read_config(path)
    from ray import serve

    from onebase.runtime import connect_ray
    from onebase.serve.app import build

    http = {"host": "127.0.0.1", "port": 8000, **(config.get("http_options") or {})}
    http.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    connect_ray(address)
    serve.start(http_options=http)
    for app in config["applications"]:
        args = dict(app.get("args") or {})
        auth = dict(args.get("auth") or {})
        token = None
        if not auth.get("admin_token") and not _env(auth.get("admin_token_env")):
            # A local endpoint still gets an admin token: one for this run, printed below.
            token = auth["admin_token"] = secrets.token_urlsafe(18)
            args["auth"] = auth
        serve.run(build(args), name=app.get("name", "onebase"), route_prefix=app.get("route_prefix", "/"),
                  blocking=False)
        url = f"http://{http['host']}:{http['port']}{app.get('route_prefix', '/').rstrip('/')}"
        print(f"serving {app.get('name', 'onebase')} at {url} (OpenAI base_url {url}/v1)", flush=True)
        if token:
            print(f"admin token for this run: {token} (export ONEBASE_ADMIN_TOKEN=... to choose it)", flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return http


def _env(name: str | None) -> str | None:
    import os

    return os.environ.get(name) if name else None
