"""The compare report, rebuilt from MLflow alone (`onebase compare --report-only RUN_ID`): the
quality table, the k-shot curve with the tuned rows as horizontal lines, quality vs bytes stored
per task, quality vs inference cost per query; and the check that every row saw the same rows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from onebase.compare.run import recorded_rows
from onebase.tracking import mlflow_run

PLOTS = ("kshot.png", "quality_vs_bytes.png", "quality_vs_cost.png", "learning_curves.png")


def rows_of(uri: str, parent: str) -> tuple[str, list[dict[str, Any]]]:
    metric = mlflow_run.client(uri).get_run(parent).data.tags.get("onebase.compare.metric")
    if metric is None:
        raise ValueError(f"run {parent} is not a compare's parent run (no onebase.compare.metric tag)")
    return metric, [record for _, record in recorded_rows(uri, parent).values()]


def same_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every scored row's evaluation-row hash, and whether they are all one."""
    hashes = {r["name"]: r.get("eval_rows_sha256") for r in rows if r["status"] == "finished"}
    distinct = sorted(set(hashes.values()))
    return {"same": len(distinct) == 1 and None not in distinct, "sha256": distinct, "per_row": hashes,
            "eval_rows": sorted({r.get("eval_rows") for r in rows if r["status"] == "finished"} - {None})}


def num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def quality(r: dict[str, Any]) -> str:
    if r["status"] != "finished":
        return "—"
    if r.get("seeds", 1) > 1:
        return f"{r['metric']:.4f} ± {r['metric_std']:.4f} ({r['seeds']} seeds)"
    if "draw_min" in r:
        return f"{r['metric']:.4f} (best of {r['draws_scored']} lr: {r['draw_min']:.3f}–{r['draw_max']:.3f})"
    return f"{r['metric']:.4f}"


def markdown(name: str, metric: str, rows: list[dict[str, Any]], check: dict[str, Any]) -> str:
    lines = [f"# Compare {name}: {metric} on one split", ""]
    if check["same"]:
        lines.append(f"Every row was scored on the same {check['eval_rows'][0]} evaluation rows "
                     f"(row-id hash {check['sha256'][0][:12]}).")
    else:
        lines.append(f"**MISMATCH: rows were scored on different evaluation rows** ({check['per_row']}).")
    lines += ["", f"| row | kind | base | {metric} (mean ± sd over seeds) | trainable params | bytes stored / task | "
              "training s | prompt tokens / query | ms / query | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -(r.get("metric", -1) if r["status"] == "finished" else -2)):
        status = "ok" if r["status"] == "finished" else f"failed: {r.get('reason', '?')}"
        lines.append(f"| {r['name']} | {r['kind']} | {r.get('base') or '—'} | {quality(r)} | "
                     f"{num(r.get('trainable_params'), ',.0f')} | {num(r.get('stored_bytes'), ',.0f')} | "
                     f"{num(r.get('train_seconds'), '.0f')} | {num(r.get('prompt_tokens_per_query'), '.1f')} | "
                     f"{num(r.get('ms_per_query'), '.2f')} | {status} |")
    return "\n".join(lines) + "\n"


def finish(fig, ax, metric: str, path: Path, plt) -> None:
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kshot_plot(rows: list[dict[str, Any]], metric: str, path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r["status"] == "finished"]
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in done:
        direct = r.get("reasoning", "direct") == "direct" and r.get("samples", 1) == 1
        if r["kind"] == "icl" or (r["kind"] == "program" and r.get("k") == 0 and direct):
            series.setdefault((r.get("demo_labels", "gold"), r.get("calibration", "none")), []).append(r)
    zero = [r for r in series.pop(("gold", "none"), []) if r["k"] == 0] if ("gold", "none") in series else []
    gold = [r for r in done if r["kind"] == "icl" and r.get("demo_labels") == "gold" and r.get("calibration") == "none"]
    if gold or zero:
        series[("gold", "none")] = zero + gold
    for (labels, calibration), points in sorted(series.items()):
        points = sorted(points, key=lambda r: r["k"])
        ax.errorbar([r["k"] for r in points], [r["metric"] for r in points],
                    yerr=[r.get("metric_std", 0) for r in points], marker="o", capsize=3,
                    label=f"ICL {labels} labels" + (", calibrated" if calibration == "contextual" else ""))
    for i, r in enumerate(r for r in done if r["kind"] in ("train", "generalist", "majority")):
        ax.axhline(r["metric"], ls=":" if r["kind"] == "majority" else "--", lw=1, color=f"C{(i + 4) % 10}",
                   label=r["name"])
    ax.set_xlabel("demonstrations k")
    finish(fig, ax, metric, path, plt)


def scatter(rows: list[dict[str, Any]], metric: str, key: str, label: str, path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [r for r in rows if r["status"] == "finished" and (r.get(key) or 0) > 0]
    for i, kind in enumerate(sorted({r["kind"] for r in points})):
        mine = [r for r in points if r["kind"] == kind]
        ax.scatter([r[key] for r in mine], [r["metric"] for r in mine], label=kind, color=f"C{i}")
        for r in mine:
            ax.annotate(r["name"], (r[key], r["metric"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    finish(fig, ax, metric, path, plt)


def curves_plot(uri: str, rows: list[dict[str, Any]], path: Path, plt) -> None:
    """Training loss against step for every draw of every tuned row (the best draw drawn thick): whether a
    method had converged, or ran out of steps, is what decides a gap between two tuning methods."""
    client = mlflow_run.client(uri)
    tuned = [r for r in rows if r["status"] == "finished" and r.get("draw_run_ids")]
    panels = max(1, len(tuned))
    cols = min(3, panels)
    lines = -(-panels // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 3.2 * lines), squeeze=False)
    for ax, r in zip(axes.flat, tuned):
        for run_id in r["draw_run_ids"]:
            history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
            lr = client.get_run(run_id).data.params.get("train.learning_rate", "?")
            best = run_id == r.get("best_run_id")
            ax.plot([m.step for m in history], [m.value for m in history], lw=2 if best else 0.8,
                    alpha=1 if best else 0.6, label=f"lr {float(lr):.2g}" + (" (best)" if best else ""))
        ax.set_title(f"{r['name']}: {r['metric']:.3f}", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("training loss", fontsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(tuned):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build(uri: str, parent: str, out_dir: Path) -> dict[str, Any]:
    """Write report.md, report.json and the plots under out_dir and log them to the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = mlflow_run.client(uri)
    metric, rows = rows_of(uri, parent)
    if not rows:
        raise ValueError(f"run {parent} has no contender (child) runs")
    name = client.get_run(parent).info.run_name
    check = same_rows(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(name, metric, rows, check)
    (out_dir / "report.md").write_text(table)
    (out_dir / "report.json").write_text(json.dumps({"name": name, "metric": metric, "same_rows": check,
                                                     "rows": rows}, indent=2, default=float))
    kshot_plot(rows, metric, out_dir / PLOTS[0], plt)
    scatter(rows, metric, "stored_bytes", "bytes stored per task (log)", out_dir / PLOTS[1], plt)
    scatter(rows, metric, "ms_per_query", "inference ms per query (log)", out_dir / PLOTS[2], plt)
    curves_plot(uri, rows, out_dir / PLOTS[3], plt)
    for file in ("report.md", "report.json", *PLOTS):
        client.log_artifact(parent, str(out_dir / file), "report")
    return {"parent_run_id": parent, "report_dir": out_dir, "rows": rows, "metric": metric, "same_rows": check,
            "markdown": table}
