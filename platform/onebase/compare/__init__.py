"""`onebase compare`: every way of prompting and every way of tuning one base, side by side on one
task and one split (spec, plan, run, report, cli)."""
