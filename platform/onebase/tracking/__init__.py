"""MLflow: one run per job, step metrics, artifacts, and registry versions for what was trained."""
