"""Run many `onebase` command lines in one fresh interpreter (imports paid once), as a user would see them.

    python tests/cli_batch.py cases.json results.json

cases.json: a list of argv lists. For each, results.json records the exit code ("traceback" when an
exception escaped `main`), stdout, stderr, and whether Ray was initialised in this process by then.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback


def ray_initialised() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def run_one(argv: list[str]) -> dict:
    from onebase.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    except BaseException:  # noqa: BLE001 - exactly what must never happen: record it
        code = "traceback"
        err.write(traceback.format_exc())
    return {"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "ray": ray_initialised()}


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    results = [run_one(argv) for argv in cases]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
