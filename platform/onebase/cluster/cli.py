"""`onebase submit`, `onebase jobs ...`, `onebase deploy`: the cluster command group (argparse only here;
Ray is imported when a command runs)."""

from __future__ import annotations

import argparse

ADDRESS_HELP = "Ray dashboard / Jobs API address (default: $RAY_ADDRESS, else http://127.0.0.1:8265)"


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help=ADDRESS_HELP)


def register(sub) -> dict:
    submit = sub.add_parser("submit", help="run a job or sweep spec on a Ray cluster (Ray Jobs API); prints its id")
    submit.add_argument("spec", help="job or sweep spec YAML (checked here first)")
    add_address(submit)
    submit.add_argument("--tracking-uri", help="the cluster's MLflow server (default: the spec's tracking.uri, "
                                               "else the cluster's MLFLOW_TRACKING_URI)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job spec field, e.g. --set train.max_steps=20")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the job (repeatable)")
    submit.add_argument("--follow", action="store_true",
                        help="then stream its logs; exit 0 if it succeeds, 1 if not")

    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    actions = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = actions.add_parser("list", help="id, status, start time and entrypoint of every job")
    add_address(listing)
    status = actions.add_parser("status", help="a job's status; the failure reason and log tail when FAILED")
    status.add_argument("job_id")
    add_address(status)
    status.add_argument("--wait", action="store_true", help="wait until it ends; exit 0 if it SUCCEEDED, else 1")
    status.add_argument("--timeout", type=float, default=3600, help="for --wait, in seconds (default 3600)")
    logs = actions.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id")
    add_address(logs)
    logs.add_argument("--follow", "-f", action="store_true",
                      help="stream until the job ends; exit 0 if it SUCCEEDED, else 1")
    logs.add_argument("--tail", type=int, help="only the last N lines")
    stop = actions.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    add_address(stop)

    deploy = sub.add_parser("deploy", help="deploy a Ray Serve config to a cluster and wait until it is RUNNING")
    deploy.add_argument("config", nargs="?", help="Serve config YAML (applications: [...], http_options)")
    add_address(deploy)
    deploy.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="add an env var to every application's runtime_env (repeatable)")
    deploy.add_argument("--timeout", type=float, default=600, help="seconds to wait for RUNNING (default 600)")
    what = deploy.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="show the cluster's Serve applications instead")
    what.add_argument("--delete", action="store_true", help="delete every Serve application on the cluster")
    return {"submit": cmd_submit, "jobs": cmd_jobs, "deploy": cmd_deploy}


def cmd_submit(args: argparse.Namespace) -> int:
    from onebase.cluster import submit

    job_id = submit.submit(args.spec, args.address, args.tracking_uri, args.overrides, args.env)
    print(job_id, flush=True)
    if args.follow:
        return 0 if submit.show_logs(args.address, job_id, follow=True) == "SUCCEEDED" else 1
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from onebase.cluster import submit

    if args.jobs_command == "list":
        submit.list_jobs(args.address)
        return 0
    if args.jobs_command == "status":
        status = submit.show_status(args.address, args.job_id, wait=args.wait, timeout=args.timeout)
        return 0 if not args.wait or status == "SUCCEEDED" else 1
    if args.jobs_command == "logs":
        status = submit.show_logs(args.address, args.job_id, follow=args.follow, tail=args.tail)
        return 0 if not args.follow or status == "SUCCEEDED" else 1
    submit.stop(args.address, args.job_id)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from onebase.cluster import deploy
    from onebase.errors import OnebaseError

    if args.status:
        deploy.show_status(args.address)
        return 0
    if args.delete:
        deploy.delete(args.address)
        return 0
    if not args.config:
        raise OnebaseError("deploy: give a Serve config file (or --status / --delete)")
    deploy.deploy(args.config, args.address, args.env, timeout=args.timeout)
    return 0
