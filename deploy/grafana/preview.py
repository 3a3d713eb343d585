"""Evaluate every panel of our Grafana dashboards against a live Prometheus and draw them.

    python deploy/grafana/preview.py --prometheus http://127.0.0.1:9090 \
        --since-s 600 --out benchmarks/results

For each dashboard JSON in deploy/grafana/dashboards/, every panel target's PromQL is sent to
Prometheus' HTTP API (`/api/v1/query_range`) with the template variables set as Grafana sets
them for "All" (`.*`) and `$__rate_interval` set from the scrape interval, then the panels are
drawn from those results with matplotlib (one PNG per dashboard, laid out as on the grid) and
summarised in a JSON beside it. No Grafana server is needed: this is how the dashboards are
proven on machines where Grafana cannot run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
# Grafana's $__rate_interval is max(4 x scrape interval, query step + scrape interval); with
# the stack's 5 s scrape interval and a 5 s step that is 20 s. 30 s smooths a sparse test load.
RATE_INTERVAL = "30s"
STEP_S = 5
METRIC_NAME = re.compile(r"\b(vllm:[a-z0-9_:]+|tessera_[a-z0-9_]+)")


@dataclass
class TargetResult:
    ref_id: str
    expr: str
    legend: str
    series: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finite_points(self) -> int:
        return sum(1 for s in self.series for _, v in s["values"] if math.isfinite(float(v)))


@dataclass
class PanelResult:
    title: str
    kind: str
    unit: str
    grid: dict[str, int]
    targets: list[TargetResult]

    @property
    def series_count(self) -> int:
        return sum(len(t.series) for t in self.targets)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Expand Grafana template variables the way Grafana does for an "All" selection."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def dashboard_variables(board: dict[str, Any]) -> dict[str, str]:
    return {
        v["name"]: ".*"
        for v in board.get("templating", {}).get("list", [])
        if v.get("type") == "query"
    }


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-row panel, including those nested in collapsed rows."""
    found = []
    for panel in board.get("panels", []):
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def metric_names(expr: str) -> set[str]:
    """Sample names a PromQL expression reads (`x_bucket`, `vllm:y_total`, ...)."""
    return set(METRIC_NAME.findall(expr))


def query_range(prometheus: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": STEP_S})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus rejected {expr!r}: {body}")
    return body["data"]["result"]


def evaluate(board: dict[str, Any], prometheus: str, start: float, end: float) -> list[PanelResult]:
    variables = dashboard_variables(board)
    results = []
    for panel in panels(board):
        targets = []
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], variables)
            targets.append(
                TargetResult(
                    target.get("refId", "A"),
                    expr,
                    target.get("legendFormat", "__auto"),
                    query_range(prometheus, expr, start, end),
                )
            )
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        results.append(
            PanelResult(
                panel["title"], panel["type"], defaults.get("unit", ""), panel["gridPos"], targets
            )
        )
    return results


def legend_text(legend: str, labels: dict[str, str]) -> str:
    if legend in ("", "__auto"):
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend)


def draw(title: str, results: list[PanelResult], start: float, path: Path) -> None:
    """One figure laid out as Grafana's 24-column grid, each panel drawn from its results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p.grid["y"] + p.grid["h"] for p in results)
    fig = plt.figure(figsize=(20, rows * 0.42 + 1))
    fig.suptitle(f"{title} (live data, Prometheus query_range)", fontsize=14)
    grid = fig.add_gridspec(rows, 24, hspace=2.5, wspace=1.5, top=1 - 0.6 / (rows * 0.42 + 1))
    for panel in results:
        g = panel.grid
        ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        ax.set_title(panel.title, fontsize=10)
        if panel.kind == "stat":
            values = [
                float(s["values"][-1][1]) for t in panel.targets for s in t.series if s["values"]
            ]
            shown = f"{values[0]:.3g}" if values and math.isfinite(values[0]) else "no data"
            ax.text(0.5, 0.45, shown, ha="center", va="center", fontsize=22)
            ax.text(0.5, 0.1, panel.unit, ha="center", fontsize=8, color="gray")
            ax.set_axis_off()
            continue
        for target in panel.targets:
            for series in target.series:
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend_text(target.legend, series["metric"]), lw=1.2)
        if panel.series_count == 0:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("s since start", fontsize=7)
        ax.set_ylabel(panel.unit, fontsize=7)
        ax.tick_params(labelsize=7)
        if panel.series_count:
            ax.legend(fontsize=6, loc="upper left")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def summary(board: dict[str, Any], results: list[PanelResult]) -> dict[str, Any]:
    return {
        "dashboard": board["title"],
        "uid": board["uid"],
        "panels": [
            {
                "title": p.title,
                "series": p.series_count,
                "targets": [
                    {"expr": t.expr, "series": len(t.series), "finite_points": t.finite_points}
                    for t in p.targets
                ],
            }
            for p in results
        ],
    }


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def preview(prometheus: str, start: float, end: float, out: Path) -> dict[str, list[PanelResult]]:
    """Evaluate and draw every dashboard; write dashboard_<uid>.png and .json under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    evaluated = {}
    for board in load_dashboards().values():
        results = evaluate(board, prometheus, start, end)
        stem = "dashboard_" + board["uid"].replace("-", "_")
        draw(board["title"], results, start, out / f"{stem}.png")
        (out / f"{stem}.json").write_text(json.dumps(summary(board, results), indent=2) + "\n")
        evaluated[board["uid"]] = results
    return evaluated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--since-s", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    end = time.time()
    for uid, results in preview(args.prometheus, end - args.since_s, end, args.out).items():
        empty = [p.title for p in results if p.series_count == 0]
        print(f"{uid}: {len(results)} panels, {len(empty)} without series {empty}")


if __name__ == "__main__":
    main()
