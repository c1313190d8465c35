"""Adapter sources and the checks an adapter directory passes before anything loads it.

Sources: a local directory, the MLflow registry (`models:/name/3`, `models:/name@alias`), or an
S3-compatible URI (`s3://bucket/prefix`; endpoint from AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL).
Only safetensors weights are accepted: a directory holding any pickle-format file is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onebase.errors import OnebaseError, error_line
from onebase.manifest import MANIFEST, run_info
from onebase.model.assets import cache_dir
from onebase.serve.config import ADAPTER_ID_PATTERN
from onebase.tasks import TASKS

ADAPTER_ID = re.compile(ADAPTER_ID_PATTERN)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SERVED_TASKS = tuple(TASKS)  # every task of the task table
PEFT_TASKS = {task.peft_task_type: name for name, task in TASKS.items()}  # PEFT's task_type -> task


class AdapterError(OnebaseError):
    """An adapter that cannot be served (bad id, source, format or base): a 4xx, never a crash."""


@dataclass
class AdapterInfo:
    """What serving needs to know about an adapter directory, read without loading any weights."""

    path: Path
    method: str
    task: str
    peft_type: str | None  # None for onebase's own methods (bitfit, houlsby, adapterbias)
    labels: list[str] | None
    base_fingerprint: str | None  # None for plain PEFT adapters made elsewhere
    prompt: dict[str, Any] | None
    weights: Path
    nbytes: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mixes_in_batch(self) -> bool:
        """LoRA adapters run side by side in one forward (PEFT `adapter_names`; PEFT refuses it for DoRA)."""
        return self.peft_type == "LORA" and not self.meta["adapter_config"].get("use_dora")


def check_id(adapter_id: str) -> str:
    if not isinstance(adapter_id, str) or not ADAPTER_ID.match(adapter_id):
        raise AdapterError(f"adapter id {adapter_id!r}: use 1-64 letters, digits, '.', '_' or '-' "
                           "(starting with a letter or digit)")
    return adapter_id


def fetch(source: str, tracking_uri: str | None = None, pin: dict[str, str] | None = None) -> Path:
    """A local directory holding the adapter named by `source` (downloaded into the cache if remote).
    `pin`: for s3:// sources, the objects' ETags as checked (`s3_listing`): exactly those are fetched."""
    if source.startswith("models:/"):
        return _from_registry(source, tracking_uri)
    if source.startswith("s3://"):
        return _from_s3(source, pin or s3_listing(source))
    if "://" in source:
        raise AdapterError(f"source {source!r}: use a local directory, models:/name/version, models:/name@alias "
                           "or s3://bucket/prefix")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise AdapterError(f"source {source}: no such directory")
    return path.resolve()


def content_digest(path: Path) -> str:
    """sha256 over every file under `path` (relative names and bytes): what a check was made on."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def fetch_checked(source: str, digest: str | None, tracking_uri: str | None = None,
                  pin: dict[str, str] | None = None) -> Path:
    """`fetch`, refusing files that differ from the ones checked (`digest`, from `content_digest`)."""
    path = fetch(source, tracking_uri, pin)
    if digest is not None and (found := content_digest(path)) != digest:
        raise AdapterError(f"source {source}: its files changed since they were checked (sha256 {digest[:12]}..., "
                           f"now {found[:12]}...); load it again")
    return path


def resolve_registry(source: str, tracking_uri: str | None) -> tuple[str, str]:
    """(name, version) for models:/name/version or models:/name@alias."""
    from mlflow.exceptions import MlflowException

    from onebase.tracking.mlflow_run import client

    ref = source.removeprefix("models:/")
    name, sep, alias = ref.partition("@")
    mlflow_client = client(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _default_uri())
    try:
        if sep:
            return name, str(mlflow_client.get_model_version_by_alias(name, alias).version)
        name, _, version = ref.rpartition("/")
        if not name or not version.isdigit():
            raise AdapterError(f"source {source!r}: expected models:/name/version or models:/name@alias")
        mlflow_client.get_model_version(name, version)
        return name, version
    except MlflowException as err:
        raise AdapterError(f"source {source}: {_first_line(err.message)}") from None


def _from_registry(source: str, tracking_uri: str | None) -> Path:
    import mlflow

    name, version = resolve_registry(source, tracking_uri)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _default_uri()
    key = hashlib.sha256(f"{uri}|{name}|{version}".encode()).hexdigest()[:16]
    target = cache_dir() / "adapters" / f"{name}-v{version}-{key}"
    if target.is_dir():
        return target  # registry versions are immutable: download once
    mlflow.set_tracking_uri(uri)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
    except Exception as err:  # unreachable store, missing artifact
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapterError(f"source {source}: download failed: {_first_line(str(err))}") from None
    if Path(local) != tmp:
        shutil.move(local, tmp / "_content")
    try:
        tmp.rename(target)
    except OSError:  # another replica finished the same download first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _s3(source: str):
    import boto3

    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint), endpoint, bucket, prefix


def s3_listing(source: str) -> dict[str, str]:
    """The objects under an s3:// prefix with their ETags: what a check pins."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3, _, bucket, prefix = _s3(source)
    try:
        listing = {obj["Key"]: obj["ETag"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix) for obj in page.get("Contents", [])}
    except (BotoCoreError, ClientError) as err:
        raise AdapterError(f"source {source}: {_first_line(str(err))}") from None
    if not listing:
        raise AdapterError(f"source {source}: no objects under that prefix")
    return listing


def _from_s3(source: str, pin: dict[str, str]) -> Path:
    """The pinned objects, downloaded once into a cache directory named after them (a changed object
    gets a directory of its own: a copy that was checked is never replaced). Each object is fetched
    on the condition that its ETag is still the pinned one."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3, endpoint, bucket, prefix = _s3(source)
    listed = json.dumps(sorted(pin.items()))
    name = hashlib.sha256(f"{endpoint}|{source}|{listed}".encode()).hexdigest()[:16]
    target = cache_dir() / "adapters" / f"s3-{name}"
    if target.is_dir():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        for key, etag in pin.items():
            rel = key[len(prefix):].lstrip("/")
            if not rel or ".." in Path(rel).parts:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            body = s3.get_object(Bucket=bucket, Key=key, IfMatch=etag)["Body"]
            with (tmp / rel).open("wb") as out:
                shutil.copyfileobj(body, out)
    except ClientError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "NoSuchKey"):
            raise AdapterError(f"source {source}: {key} changed since it was checked (ETag {etag}); "
                               "load it again") from None
        raise AdapterError(f"source {source}: {_first_line(str(err))}") from None
    except BotoCoreError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapterError(f"source {source}: {_first_line(str(err))}") from None
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same download first: the same pinned bytes
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def inspect(path: Path) -> AdapterInfo:
    """Read an adapter directory's configs and check its weights, without building any model."""
    path = _adapter_root(path)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(f"adapter {path.name}: holds pickle-format weights ({', '.join(pickles)}); "
                           "only safetensors are accepted")
    meta = _read_json(path / MANIFEST) if (path / MANIFEST).is_file() else {}
    if meta:
        run_info(meta, f"adapter {path.name}: {MANIFEST}", AdapterError)  # its fields' types (onebase/manifest.py)
    config = _read_json(path / "adapter_config.json") if (path / "adapter_config.json").is_file() else None
    if config is None:
        hint = " (a full fine-tune is a whole model, not an adapter)" if (path / "config.json").is_file() else ""
        raise AdapterError(f"adapter {path.name}: no adapter_config.json{hint}")
    if "onebase_method" in config:
        method, peft_type, weights = config["onebase_method"], None, path / "adapter.safetensors"
        task = config.get("task", meta.get("task"))
    else:
        peft_type = str(config.get("peft_type", "")).upper()
        if not peft_type:
            raise AdapterError(f"adapter {path.name}: adapter_config.json names no peft_type")
        method = meta.get("method") or peft_type.lower()
        task = meta.get("task") or PEFT_TASKS.get(str(config.get("task_type")), "causal-lm")
        weights = path / "adapter_model.safetensors"
        if peft_type == "LORA" and config.get("use_dora"):
            method = meta.get("method", "dora")
    if task not in SERVED_TASKS:
        raise AdapterError(f"adapter {path.name}: task {task} is not served (served: {', '.join(SERVED_TASKS)})")
    nbytes = _check_safetensors(weights)
    return AdapterInfo(path=path, method=method, task=task, peft_type=peft_type, labels=meta.get("labels"),
                       base_fingerprint=meta.get("base_fingerprint"), prompt=meta.get("prompt"),
                       weights=weights, nbytes=nbytes, meta={"adapter_config": config, **meta})


def _adapter_root(path: Path) -> Path:
    """The directory with adapter_config.json: the path itself or its one subdirectory (MLflow downloads)."""
    if (path / "adapter_config.json").is_file():
        return path
    subdirs = [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    found = [p for p in subdirs if (p / "adapter_config.json").is_file()]
    return found[0] if len(found) == 1 else path


def _check_safetensors(weights: Path) -> int:
    from safetensors import SafetensorError, safe_open

    if not weights.is_file():
        raise AdapterError(f"adapter {weights.parent.name}: missing {weights.name}")
    try:
        with safe_open(str(weights), framework="pt") as file:
            nbytes = 0
            for key in file.keys():
                tensor = file.get_slice(key)
                shape = tensor.get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                if count == 0:
                    raise AdapterError(f"adapter {weights.parent.name}: tensor {key} is empty")
                nbytes += count * _dtype_bytes(tensor.get_dtype())
    except SafetensorError as err:
        raise AdapterError(f"adapter {weights.parent.name}: {weights.name} is not valid safetensors "
                           f"({_first_line(str(err))})") from None
    if nbytes == 0:
        raise AdapterError(f"adapter {weights.parent.name}: {weights.name} holds no tensors")
    return nbytes


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"adapter {path.parent.name}: {path.name} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise AdapterError(f"adapter {path.parent.name}: {path.name} is not a JSON object")
    return value


def _first_line(text: str) -> str:
    return error_line(text) or "unknown error"


def _default_uri() -> str:
    from onebase.tracking.mlflow_run import default_tracking_uri

    return default_tracking_uri()
