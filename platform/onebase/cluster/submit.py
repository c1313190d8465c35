"""`onebase submit` and `onebase jobs`: run job and sweep specs on a Ray cluster over the Ray Jobs API.

The spec is validated here first (the same one-line errors as `onebase run`), then packaged into a
runtime-env working_dir: the spec (for a sweep also its base job), local data files and a local model
folder it names, rewritten to relative paths. The entrypoint is `onebase run|sweep <spec>` on the
cluster, so the cluster's nodes need onebase installed (infra/Dockerfile.*, infra/ray-cluster.yaml).

Tracking: `--tracking-uri` if given, else the spec's `tracking.uri`, else the job uses the cluster's
MLFLOW_TRACKING_URI. A local store (sqlite:, file:, a path) is refused: the job could not write it.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onebase.errors import ClusterError, DataError, OnebaseError, SpecError, error_line
from onebase.spec.load import read_yaml

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 5  # an unreachable cluster fails in seconds, never hangs
READ_TIMEOUT_S = 120  # uploads of a packaged working_dir can take a while
MAX_PACKAGE_BYTES = 400 << 20  # Ray's working_dir upload limit is 500 MiB
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOCAL_TRACKING = ("sqlite:", "file:")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --- connecting ---------------------------------------------------------------------------------

def resolve_address(address: str | None) -> str:
    """--address, else $RAY_ADDRESS, else the local dashboard; 'host:port' gets http://."""
    address = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def with_timeouts(cls):
    """Ray's submission clients call requests without a timeout: add one to every request."""

    class Timed(cls):
        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
            return super()._do_request(method, endpoint, **kwargs)

    Timed.__name__ = cls.__name__
    return Timed


def reason(err: BaseException) -> str:
    """A short cause: 'Connection refused', 'timed out after 5 s', or the error's last line."""
    text = str(err)
    if "timed out" in text.lower() or type(err).__name__ in ("ConnectTimeout", "ReadTimeout", "Timeout"):
        return f"timed out after {CONNECT_TIMEOUT_S} s"
    if "authentication token" in text.lower() or type(err).__name__ == "AuthenticationError":
        return "the cluster wants a Ray auth token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token)"
    errno = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno[-1].strip()
    return error_line(err, last=True, limit=300)


def connect(cls, address: str | None, what: str):
    """An instance of a Ray submission client class for `address`, after a short probe so that a wrong
    address fails in one line within seconds (Ray's own check would say only 'Failed to connect')."""
    import requests

    url = resolve_address(address)
    try:
        requests.get(f"{url}/api/version", timeout=(CONNECT_TIMEOUT_S, 10))
    except requests.exceptions.ConnectTimeout:
        raise ClusterError(f"--address {url}: cannot reach {what} (no answer within {CONNECT_TIMEOUT_S} s)") \
            from None
    except requests.exceptions.RequestException as err:
        raise ClusterError(f"--address {url}: cannot reach {what} ({reason(err)})") from None
    try:
        return with_timeouts(cls)(url)
    except Exception as err:  # 404 from a server that is not Ray's dashboard, bad scheme, auth
        raise ClusterError(f"--address {url}: not {what} ({reason(err)})") from None


def jobs_client(address: str | None):
    """A JobSubmissionClient for `address`; ClusterError in one line when nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    return connect(JobSubmissionClient, address, "the Ray Jobs API")


def call(client, what: str, job_id: str | None, fn, *args):
    """Run one Jobs API request, turning Ray's RuntimeErrors into one-line ClusterErrors."""
    try:
        return fn(*args)
    except Exception as err:
        text = str(err)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise ClusterError(f"job {job_id}: no such job on {client.get_address()} "
                               f"(see onebase jobs list)") from None
        raise ClusterError(f"{what} on {client.get_address()}: {reason(err)}") from None


# --- packaging ------------------------------------------------------------------------------------

@dataclass
class Package:
    kind: str  # job | sweep
    name: str
    spec_file: str  # inside the working dir
    workdir: Path
    tracking_uri: str | None  # passed as --tracking-uri (None: the spec's own, or the cluster's env)
    files: list[str] = field(default_factory=list)  # packaged local files, as shown to the user

    @property
    def entrypoint(self) -> str:
        command = "run" if self.kind == "job" else "sweep"
        parts = ["onebase", command, self.spec_file]
        if self.tracking_uri:
            parts += ["--tracking-uri", self.tracking_uri]
        return shlex.join(parts)


def check_tracking_uri(uri: str | None, where: str) -> None:
    if uri is None:
        return
    scheme = uri.split("://", 1)[0] + ":" if "://" in uri else ""
    if uri.startswith(LOCAL_TRACKING) or not scheme:
        raise SpecError(f"{where} {uri}: a job on the cluster cannot write this machine's local MLflow store; "
                        f"give the cluster's MLflow server (http://HOST:5000), or leave it out to use the "
                        f"cluster's MLFLOW_TRACKING_URI")


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise OnebaseError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def is_bundled(source: str | None) -> bool:
    return source is None or source.startswith("bundled:")


class Packer:
    """Copies local files a spec names into the working dir and hands back their relative paths."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.copied: dict[Path, str] = {}
        self.size = 0

    def add(self, local: Path, folder: str) -> str:
        local = local.resolve()
        if local in self.copied:
            return self.copied[local]
        target = Path(folder) / f"{len(self.copied)}-{local.name}"
        dest = self.workdir / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        if local.is_dir():
            shutil.copytree(local, dest)
            self.size += sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        else:
            shutil.copy2(local, dest)
            self.size += dest.stat().st_size
        if self.size > MAX_PACKAGE_BYTES:
            raise ClusterError(f"{local}: the job's files exceed {MAX_PACKAGE_BYTES >> 20} MiB, more than a Ray "
                               f"working_dir can carry; put them where the cluster can read them")
        self.copied[local] = target.as_posix()
        return target.as_posix()

    def data(self, field_name: str, value: str | None) -> str | None:
        if is_bundled(value):
            return value
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"{field_name}: file not found: {value}")
        return self.add(path, "data")

    def model(self, value: str | None) -> str | None:
        if value and Path(value).expanduser().is_dir():  # a local HF folder; names and hub ids stay
            return self.add(Path(value).expanduser(), "model")
        if value and value.startswith(("/", "./", "../", "~")):
            from onebase.errors import ModelError

            raise ModelError(f"model.name: cannot load {value!r}: no such folder (submit packages a local "
                             f"model folder with the job)")
        return value


def rewrite_job(raw: dict[str, Any], packer: Packer) -> None:
    rewrite_data(raw.get("data"), packer, "data")
    # Instruction-tuning mixtures and held-out tasks name more data files (spec/mixture.py).
    data = raw.get("data")
    for i, source in enumerate(as_list(data.get("mixture") if isinstance(data, dict) else None)):
        if isinstance(source, dict) and "source" in source:
            source["source"] = packer.data(f"data.mixture[{i}].source", source["source"])
    evaluation = raw.get("evaluation")
    for i, task in enumerate(as_list(evaluation.get("held_out") if isinstance(evaluation, dict) else None)):
        if isinstance(task, dict):
            rewrite_data(task.get("data"), packer, f"evaluation.held_out[{i}].data")
    model = raw.get("model")
    if isinstance(model, dict) and "name" in model:
        model["name"] = packer.model(model["name"])


def rewrite_data(data: Any, packer: Packer, field: str) -> None:
    if not isinstance(data, dict):
        return
    if "source" in data and data["source"] != "mixture":  # mixture: the rows come from data.mixture
        data["source"] = packer.data(f"{field}.source", data["source"])
    validation = data.get("validation")
    if isinstance(validation, dict) and validation.get("path"):
        validation["path"] = packer.data(f"{field}.validation.path", validation["path"])


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def package(spec_path: str | Path, workdir: Path, overrides: list[str] | None = None,
            tracking_uri: str | None = None) -> Package:
    """Validate a job or sweep spec and lay out what the cluster needs under `workdir`."""
    from onebase.spec import load_spec, parse_spec, spec_kind
    from onebase.spec.load import apply_override

    spec_path = Path(spec_path)
    check_tracking_uri(tracking_uri, "--tracking-uri")
    packer = Packer(workdir)
    if spec_kind(spec_path) == "sweep":
        from onebase.sweep.spec import load_sweep

        if overrides:
            raise OnebaseError("--set applies to job specs; a sweep sets job fields under overrides:")
        sweep, base = load_sweep(spec_path)  # every trial validated, as `onebase sweep` does
        job = parse_spec(base)
        if not tracking_uri:
            check_tracking_uri(job.tracking.uri, "tracking.uri")
        check_local_data(job)
        raw = read_yaml(spec_path)
        for key in ("data.source", "data.validation.path"):
            if key in raw.get("overrides", {}):
                raw["overrides"][key] = packer.data(key, raw["overrides"][key])
        if "model.name" in raw.get("overrides", {}):
            raw["overrides"]["model.name"] = packer.model(raw["overrides"]["model.name"])
        if raw.get("job"):
            base_raw = read_yaml(spec_path.parent / str(raw["job"]))
            rewrite_job(base_raw, packer)
            job_file = Path(str(raw["job"])).name
            if job_file == spec_path.name:
                job_file = f"job-{job_file}"
            (workdir / job_file).write_text(yaml.safe_dump(base_raw, sort_keys=False))
            raw["job"] = job_file
        else:
            rewrite_job(raw["base"], packer)
        (workdir / spec_path.name).write_text(yaml.safe_dump(raw, sort_keys=False))
        return Package("sweep", sweep.name, spec_path.name, workdir, tracking_uri, sorted(map(str, packer.copied)))

    spec = load_spec(spec_path, overrides)
    if not tracking_uri:
        check_tracking_uri(spec.tracking.uri, "tracking.uri")
    check_local_data(spec)
    raw = read_yaml(spec_path)
    for item in overrides or []:
        apply_override(raw, item)
    rewrite_job(raw, packer)
    parse_spec(raw, source=str(spec_path))  # still a valid spec after the rewrite
    target = workdir / spec_path.name
    if raw == read_yaml(spec_path):
        shutil.copy2(spec_path, target)  # unchanged: keep the user's file, comments and all
    else:
        target.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Package("job", spec.name, spec_path.name, workdir, tracking_uri, sorted(map(str, packer.copied)))


def check_local_data(spec) -> None:
    """Columns and labels of local data files, checked here as `onebase run` would (bundled data is the
    cluster's business)."""
    if is_bundled(spec.data.source) or (spec.data.validation.path and is_bundled(spec.data.validation.path)):
        return
    from onebase.data.sources import load_dataset

    load_dataset(spec)


# --- commands -------------------------------------------------------------------------------------

def submit(spec_path: str, address: str | None = None, tracking_uri: str | None = None,
           overrides: list[str] | None = None, env: list[str] | None = None, echo=print) -> str:
    """Validate, package and submit; returns the submission id."""
    env_vars = parse_env(env or [])
    with tempfile.TemporaryDirectory(prefix="onebase-submit-") as tmp:
        pkg = package(spec_path, Path(tmp), overrides, tracking_uri)
        client = jobs_client(address)  # only once the spec is known to be good
        env_vars = {
            "PYTHONUNBUFFERED": "1",  # progress lines reach `jobs logs --follow` as they happen
            # `onebase run` adds its own env_vars in ray.init; let them merge with the job's.
            "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
            **env_vars,
        }
        submission_id = f"{pkg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        metadata = {"onebase.kind": pkg.kind, "onebase.name": pkg.name, "onebase.spec": str(spec_path)}
        job_id = call(client, "submit", None, lambda: client.submit_job(
            entrypoint=pkg.entrypoint, submission_id=submission_id, metadata=metadata,
            runtime_env={"working_dir": str(pkg.workdir), "env_vars": env_vars}))
    tracking = (f"--tracking-uri {tracking_uri}" if tracking_uri else
                "the spec's tracking.uri" if has_spec_uri(pkg) else "the cluster's MLFLOW_TRACKING_URI")
    echo(f"submitted {pkg.kind} {pkg.name} to {client.get_address()} as {job_id}"
         + (f" (with {len(pkg.files)} local file(s))" if pkg.files else "") + f"; tracking: {tracking}",
         file=sys.stderr)
    echo(f"follow: onebase jobs logs {job_id} --follow --address {client.get_address()}", file=sys.stderr)
    return job_id


def has_spec_uri(pkg: Package) -> bool:
    raw = read_yaml(pkg.workdir / pkg.spec_file) if (pkg.workdir / pkg.spec_file).exists() else {}
    return bool((raw.get("tracking") or {}).get("uri"))


def when(epoch_ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_ms / 1000)) if epoch_ms else "-"


def list_jobs(address: str | None = None, out=sys.stdout) -> list:
    client = jobs_client(address)
    jobs = call(client, "list jobs", None, client.list_jobs)
    jobs = sorted(jobs, key=lambda j: j.start_time or 0)
    rows = [(j.submission_id or j.job_id or "-", str(j.status.value if hasattr(j.status, "value") else j.status),
             when(j.start_time), j.entrypoint or "") for j in jobs]
    width = max([len(r[0]) for r in rows] + [2])
    print(f"{'ID':<{width}}  {'STATUS':<9}  {'START':<19}  ENTRYPOINT", file=out)
    for job_id, status, start, entrypoint in rows:
        print(f"{job_id:<{width}}  {status:<9}  {start:<19}  {entrypoint}", file=out)
    if not rows:
        print(f"(no jobs on {client.get_address()})", file=out)
    return jobs


def status_of(info) -> str:
    return str(info.status.value if hasattr(info.status, "value") else info.status)


def job_logs(client, job_id: str) -> str:
    return call(client, "logs", job_id, client.get_job_logs, job_id) or ""


def failure_reason(info, logs: str) -> str:
    """One line: onebase's own error line from the logs if there is one, else Ray's message."""
    errors = [line.strip() for line in logs.splitlines() if line.startswith("onebase: error:")]
    if errors:
        return errors[-1]
    message = (info.message or "").strip()
    first = message.splitlines()[0] if message else ""
    return first or (f"exit code {info.driver_exit_code}" if info.driver_exit_code is not None else "unknown")


def show_status(address: str | None, job_id: str, wait: bool = False, timeout: float = 3600, tail: int = 25,
                out=sys.stdout) -> str:
    client = jobs_client(address)
    info = call(client, "status", job_id, client.get_job_info, job_id)
    deadline = time.monotonic() + timeout
    while wait and status_of(info) not in TERMINAL:
        if time.monotonic() > deadline:
            raise ClusterError(f"job {job_id}: still {status_of(info)} after {timeout:.0f} s")
        time.sleep(2)
        info = call(client, "status", job_id, client.get_job_info, job_id)
    status = status_of(info)
    print(f"job:        {job_id}", file=out)
    print(f"status:     {status}", file=out)
    print(f"entrypoint: {info.entrypoint}", file=out)
    print(f"started:    {when(info.start_time)}   ended: {when(info.end_time)}", file=out)
    if status == "FAILED":
        logs = ANSI.sub("", job_logs(client, job_id))
        print(f"reason:     {failure_reason(info, logs)}", file=out)
        if info.message:
            print(f"ray:        {info.message.strip().splitlines()[0]}", file=out)
        lines = logs.rstrip().splitlines()[-tail:]
        if lines:
            print(f"log tail ({len(lines)} lines):", file=out)
            for line in lines:
                print(f"  {line}", file=out)
    elif info.message:
        print(f"message:    {info.message.strip().splitlines()[0]}", file=out)
    return status


def show_logs(address: str | None, job_id: str, follow: bool = False, tail: int | None = None,
              out=sys.stdout) -> str:
    """Print the job's logs (all, the last `tail` lines, or followed live); returns the job's status."""
    client = jobs_client(address)
    info = call(client, "status", job_id, client.get_job_info, job_id)
    if not follow:
        lines = job_logs(client, job_id).splitlines()
        for line in lines[-tail:] if tail else lines:
            print(line, file=out)
        return status_of(info)

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(stream())
    except Exception as err:
        raise ClusterError(f"logs --follow {job_id} on {client.get_address()}: {reason(err)}") from None
    return status_of(call(client, "status", job_id, client.get_job_info, job_id))


def stop(address: str | None, job_id: str, wait: float = 30, out=sys.stdout) -> str:
    client = jobs_client(address)
    call(client, "status", job_id, client.get_job_info, job_id)
    requested = call(client, "stop", job_id, client.stop_job, job_id)
    deadline = time.monotonic() + wait
    status = status_of(call(client, "status", job_id, client.get_job_info, job_id))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        status = status_of(call(client, "status", job_id, client.get_job_info, job_id))
    note = "" if requested else " (it had already ended)"
    print(f"{job_id}: {status}{note}", file=out)
    return status
