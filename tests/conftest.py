"""Shared fixtures: an isolated workspace, one real local Ray for the session, spec builders."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Ray, MLflow and DeepSpeed write under HOME/TMPDIR; the model cache stays shared so the SmolLM2
# conversion and DeepSpeed's JIT build happen once per machine, not once per test session.
os.environ.setdefault("ONEBASE_CACHE", str(REPO / ".onebase" / "cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["ONEBASE_CACHE"]) / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

TINY_BERT = {"name": "minilm", "init": "random",
             "config_overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 128}}
TINY_LLAMA = {"name": "smollm2-135m-instruct", "init": "random",
              "config_overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                   "num_key_value_heads": 1, "intermediate_size": 128}}


ASYNC_IO_BUILD = pytest.StashKey()


def pytest_configure(config):
    config.addinivalue_line("markers", "async_io: loads DeepSpeed's async_io op (NVMe offload); a selection with "
                                       "such a test starts building the op in the background")


def pytest_collection_modifyitems(config, items):
    """On a new machine DeepSpeed JIT-builds the async_io op (and pin_memory) the first time NVMe offload
    runs: minutes of compiler on 2 cores, inside the one test's workers. Started at nice 19 while
    the tests before it run, it takes their idle CPU instead; the workers wait on torch's build
    lock if it is not done. Where the ops are cached it finds them up to date in seconds."""
    if any(item.get_closest_marker("async_io") for item in items):
        import subprocess

        cache = Path(os.environ["ONEBASE_CACHE"])
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / "async-io-build.log", "w") as log:
            config.stash[ASYNC_IO_BUILD] = subprocess.Popen(
                ["nice", "-n", "19", sys.executable, "-c",
                 "from onebase.train.ds_ops import build_async_io; build_async_io()"], cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT)


def pytest_unconfigure(config):
    build = config.stash.get(ASYNC_IO_BUILD, None)
    if build is not None:  # never leave it half done: torch's build lock would outlive it
        build.wait()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onebase")
    os.chdir(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster(workspace):
    """One real local Ray (2 CPUs) for every in-process training test."""
    import tempfile

    import ray

    from onebase.train.launch import connect_ray

    # Ray's socket paths must stay under 107 bytes: a short private temp dir, not the pytest one.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="obray-", dir="/tmp")
    connect_ray(None)
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_http(ray_cluster) -> str:
    """One Ray Serve instance (controller + HTTP proxy on 127.0.0.1) for the serving test modules:
    each runs its own application on it and deletes it when done (starting Serve once saves time)."""
    from ray import serve

    from onebase.runtime import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def tiny_spec(job: str, **sections) -> dict:
    """A seq-cls job on a tiny random BERT (MiniLM's tokenizer) over 192 bundled tweets."""
    spec = {
        "name": job,
        "task": "sequence-classification",
        "model": TINY_BERT,
        "data": {"source": "bundled:tweet-sentiment", "max_samples": 192, "max_length": 40,
                 "validation": {"max_samples": 64}},
        "method": {"name": "full"},
        "train": {"epochs": 1, "batch_size": 16, "learning_rate": 3e-3, "log_every_steps": 2},
        "scaling": {"num_workers": 2},
    }
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) and isinstance(value, dict) else value
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def onebase_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900):
    import subprocess

    return subprocess.run([sys.executable, "-m", "onebase.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def wait_for(check, what: str, timeout_s: float = 60):
    """Poll `check` until it returns something true (returned), or fail naming `what`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
