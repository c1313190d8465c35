"""The `onebase` command line."""

from __future__ import annotations

import argparse
import sys

from onebase.errors import OnebaseError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onebase", description="one base model, many specialists")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a job spec on Ray Train + DeepSpeed, tracked in MLflow")
    run.add_argument("spec", help="job spec YAML")
    run.add_argument("--address", help="Ray cluster address ('auto' for a running local cluster)")
    run.add_argument("--resume", action="store_true", help="continue the last run of this job from its checkpoint")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's, else ./mlflow.db)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec field, e.g. --set train.max_steps=20")
    run.add_argument("--verbose", action="store_true", help="also show Ray's, DeepSpeed's and the workers' logs")

    sweep = sub.add_parser("sweep", help="Ray Tune over tuning methods; a report per method at the end")
    sweep.add_argument("spec", help="sweep spec YAML")
    sweep.add_argument("--address", help="Ray cluster address ('auto' for a running local cluster)")
    sweep.add_argument("--tracking-uri", help="MLflow tracking URI (default: the base job's, else ./mlflow.db)")
    sweep.add_argument("--report-only", metavar="PARENT_RUN_ID",
                       help="rebuild the report of an earlier sweep from its MLflow parent run; trains nothing")
    sweep.add_argument("--out", help="where --report-only writes the report (default: runs/<sweep>/<run id>)")

    validate = sub.add_parser("validate", help="every check `onebase run` makes, without starting Ray or training")
    validate.add_argument("spec")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument("--tracking-uri", help="the MLflow tracking URI the run would use")
    validate.add_argument("--address", help="also check that the workers fit this running Ray cluster")

    commands = dict(COMMANDS)
    for register in command_groups():
        commands.update(register(sub))
    args = parser.parse_args(argv)
    try:
        return commands[args.command](args)
    except OnebaseError as err:
        print(f"onebase: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("onebase: interrupted; continue with --resume", file=sys.stderr)
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from onebase.spec import load_spec

    spec = load_spec(args.spec, args.overrides)  # fails fast, before importing Ray or torch
    from onebase.train.forked_checks import ModelChecks

    checks = ModelChecks.start(spec)  # on a second process while this one imports Ray, torch, MLflow
    try:
        from onebase.train.launch import print_summary, run_job

        result = run_job(spec, Path(args.spec).read_text(), address=args.address, resume=args.resume,
                         tracking_uri=args.tracking_uri, verbose=args.verbose, model_checks=checks)
    finally:
        checks.close()
    print_summary(result)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from onebase.sweep.spec import load_sweep

    sweep, base = load_sweep(args.spec)  # every trial's spec is checked before Ray or Tune start
    from onebase.spec import parse_spec
    from onebase.sweep import report
    from onebase.sweep.run import run_sweep
    from onebase.tracking.mlflow_run import resolve_tracking_uri

    if args.report_only:
        job = parse_spec(base)
        uri = resolve_tracking_uri(args.tracking_uri, job.tracking.uri)
        out = Path(args.out or Path(job.output.path) / sweep.name / args.report_only)
        try:
            result = report.build(uri, args.report_only, sweep.metric, sweep.mode, out)
        except Exception as err:  # a wrong run id is the usual cause: say so in one line
            raise OnebaseError(f"--report-only {args.report_only}: {err}") from None
    else:
        result = run_sweep(sweep, base, Path(args.spec).read_text(), address=args.address,
                           tracking_uri=args.tracking_uri)
    print(report.markdown(result["table"], sweep.metric, f"sweep {sweep.name}"))
    print(f"report: {result['report_dir'] / 'report.md'}, {result['report_dir'] / 'pareto.png'}")
    print(f"mlflow parent run: {result['parent_run_id']}")
    for method, version in result.get("registered", {}).items():
        print(f"registered {method}: {version}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from onebase.spec import load_spec, spec_kind

    if spec_kind(args.spec) == "compare":  # the same checks as `onebase compare` before Ray
        from onebase.compare.cli import validate_compare

        return validate_compare(args.spec, args.overrides)
    if spec_kind(args.spec) == "prompt-program":  # the same checks as `onebase prompt validate`
        from onebase.prompt.cli import validate_program

        return validate_program(args.spec, args.overrides)
    if spec_kind(args.spec) == "sweep":
        from onebase.sweep.spec import draw_trials, load_sweep

        if args.overrides:
            raise OnebaseError("--set applies to job specs; a sweep sets job fields under overrides:")
        sweep, _ = load_sweep(args.spec)
        print(f"{args.spec}: ok (sweep over {len(sweep.methods)} method(s), {len(draw_trials(sweep))} trial(s), "
              f"scheduler {sweep.scheduler.type})")
        return 0
    spec = load_spec(args.spec, args.overrides)
    from onebase.train.preflight import validate_job

    summary = validate_job(spec, tracking_uri=args.tracking_uri, address=args.address)
    print(f"{args.spec}: ok ({spec.task}, method {spec.method.name}, {spec.scaling.num_workers} worker(s), "
          f"ZeRO-{spec.deepspeed.stage}; {summary})")
    return 0


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "validate": cmd_validate}


# Further command groups: modules with `register(subparsers) -> {command: handler}`. Their
# top-level imports stay light (argparse only) so `onebase --help` and bad input stay fast.
COMMAND_GROUPS: list[str] = ["onebase.serve.cli", "onebase.cluster.cli", "onebase.prompt.cli",
                              "onebase.compare.cli"]


def command_groups():
    import importlib

    return [importlib.import_module(name).register for name in COMMAND_GROUPS]

if __name__ == "__main__":
    sys.exit(main())
