"""The Ray Serve application: a gateway (FastAPI ingress), one deployment per base, a catalog.

    Gateway  --(multiplexed_model_id "<id>#<revision>")-->  BaseServer (one frozen base each)
        \\--> Catalog (entry id -> kind, source, base, revision)

A request names a model: a base (the generalist) or a catalog entry (an adapter). The gateway
(`gateway.py`) resolves an entry to its current revision and lets Serve's model multiplexing route
it to a replica (`replica.py`) that already holds that revision; replicas load entries on first
use (LRU of `max_adapters`). Loading a new version or moving an alias stages a new revision in the
catalog (`catalog.py`), warms it on a replica, then switches the catalog to it: requests already
running keep the revision they started with.
"""

from __future__ import annotations

from typing import Any

from onebase.serve.catalog import Catalog
from onebase.serve.config import ServeArgs
from onebase.serve.gateway import Gateway
from onebase.serve.replica import server_deployment


def build(args: dict[str, Any]):
    """The application builder named in Serve configs: `import_path: onebase.serve.app:build`."""
    parsed = ServeArgs.model_validate(args)
    catalog = Catalog.bind()
    servers = {}
    for base in parsed.bases:
        deployment = server_deployment(base.max_adapters).options(
            name=f"base-{base.model_name}", num_replicas=base.replicas,
            ray_actor_options={"num_cpus": base.cpus, "num_gpus": base.gpus},
            max_ongoing_requests=base.max_batch_size + base.max_queue + 16)
        servers[base.model_name] = deployment.bind(base.model_dump(), catalog, parsed.tracking_uri,
                                                   parsed.limits.model_dump())
    return Gateway.bind(catalog, servers, parsed.model_dump())
