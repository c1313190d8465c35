"""DeepSpeed's JIT-built C++ ops on CPU (`shm_comm`): built once per machine, then reused by every run.

`python -m onebase.train.ds_ops` builds them ahead of time (e.g. in an image), into
$TORCH_EXTENSIONS_DIR (default `$ONEBASE_CACHE/torch_extensions`); `--nvme` adds the async_io op.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def pin_ninja() -> None:
    """Make torch build with the `ninja` of this Python environment, whatever PATH says.

    torch runs the first `ninja` on PATH. A venv carries pip's ninja (1.13, build log v7) and the
    system often has another (1.11, log v5); each one throws away the other's `.ninja_log`
    ("build log version is too old; starting over") and recompiles. So the cached `shm_comm` op was
    rebuilt (~30 s) on every run whose PATH differed from the last one's (an activated venv or not,
    a Ray node started from the venv): the "two build hashes" that alternated. One ninja, one log.
    """
    bin_dir = str(Path(sys.executable).parent)
    if not (Path(bin_dir) / "ninja").is_file():
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


def import_deepspeed(without_mlflow: bool) -> None:
    """Import DeepSpeed now; `without_mlflow`: for a process that never logs to MLflow itself (a
    training worker whose rank 0 relays through the driver's board, train/tracker.py).

    DeepSpeed's runtime config imports its autotuning package, whose autotuner imports MLflow if it
    can, only to log autotuning experiments, which a training engine never runs: ~0.8 s of the ~1 s
    DeepSpeed import on the 2-core machine, on each worker's way to its first step. A None entry in
    sys.modules makes that `import mlflow` fail (DeepSpeed then goes without, as where MLflow is not
    installed); the entry is removed afterwards, so a later `import mlflow` here works as usual."""
    if not without_mlflow or "mlflow" in sys.modules or "deepspeed" in sys.modules:
        import deepspeed  # noqa: F401
        return
    sys.modules["mlflow"] = None  # type: ignore[assignment]
    try:
        import deepspeed  # noqa: F401
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]


def extensions_dir() -> str:
    """Where torch keeps JIT-built ops: $TORCH_EXTENSIONS_DIR, else under onebase's cache."""
    from onebase.model.assets import cache_dir

    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(cache_dir() / "torch_extensions")


def build_ops(nvme: bool = False) -> str:
    """Build (or find up to date) the ops a CPU run loads, with `nvme` also those of NVMe offload
    (build_async_io); returns the extensions directory."""
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()
    pin_ninja()
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    builder = ShareMemCommBuilder()
    if builder.is_compatible(verbose=False):
        builder.load(verbose=False)
    if nvme:
        build_async_io()
    return os.environ["TORCH_EXTENSIONS_DIR"]


def build_async_io() -> None:
    """Build (or find up to date) the async_io op NVMe offload loads, and pin_memory, which it loads
    first: 14 files that each parse torch's headers, minutes on 2 cores."""
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()
    pin_ninja()
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("AsyncIOBuilder").load(verbose=False)


@contextlib.contextmanager
def deepspeed_silenced() -> Iterator[None]:
    """DeepSpeed imported, and nothing it or a compiler it runs says shows, for the block: Python's
    logging off, file descriptors 1 and 2 on /dev/null, then sys.stdout and sys.stderr too.

    sys.stderr becomes a real file, not an io.StringIO: DeepSpeed's `has_function` silences its
    compile test through `sys.stderr.fileno()` and reports the library missing when that raises (on
    a StringIO, or pytest's capture): that is how an installed libaio read as absent. DeepSpeed is
    imported before sys.stdout is replaced: its log handler keeps the stream it finds at import.
    """
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    logging_off = logging.root.manager.disable
    with open(os.devnull, "w") as null:
        try:
            for fd in saved:
                os.dup2(null.fileno(), fd)
            logging.disable(logging.CRITICAL)
            import deepspeed  # noqa: F401
            with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                yield
        finally:
            logging.disable(logging_off)
            sys.stdout.flush()  # what the block left in Python's buffer goes to /dev/null as well
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


def async_io_missing() -> str | None:
    """Why DeepSpeed's async_io op (what NVMe offload reads and writes with) cannot build on this
    machine, or None when it can. It links libaio: without its headers and library, DeepSpeed fails
    only inside the workers, after Ray and the model have started. DeepSpeed compiles and links a
    test program calling `io_submit` with `-laio` (CFLAGS and LDFLAGS apply, as in its own build)."""
    with deepspeed_silenced():
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("AsyncIOBuilder")
        if builder is None:
            return f"the {get_accelerator().device_name()} accelerator has no async_io op"
        if not builder.has_function("io_submit", ("aio",)):
            return "libaio not found (its headers and library: the libaio-dev package, or CFLAGS/LDFLAGS to them)"
        if not builder.is_compatible(verbose=False):
            return "DeepSpeed reports it incompatible with this torch or compiler"
    return None


if __name__ == "__main__":
    # --nvme: also the async_io op (needs libaio), e.g. in an image whose jobs offload to NVMe
    print(f"deepspeed ops ready in {build_ops(nvme='--nvme' in sys.argv[1:])}")
