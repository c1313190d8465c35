"""Cluster operations: submit jobs and sweeps over the Ray Jobs API, deploy Serve configs, a local stack.

- `submit.py`  `onebase submit` and `onebase jobs list|status|logs|stop` (ray.job_submission)
- `deploy.py`  `onebase deploy` of a Ray Serve config through the dashboard's REST API
- `stack.py`   a local two-node Ray cluster + MLflow server on 127.0.0.1 (`infra/local-stack.sh`)
- `cli.py`     the argparse wiring; imports stay light so `onebase --help` stays fast
"""
