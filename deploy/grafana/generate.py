"""Generate tessera's Grafana dashboards with grafana-foundation-sdk (Grafana's typed builders).

    python deploy/grafana/generate.py            # rewrite deploy/grafana/dashboards/*.json
    python deploy/grafana/generate.py --check    # fail if a committed JSON differs

Two dashboards:
- `tessera / Gateway`: what clients see. Request rate and errors per route and status,
  end-to-end and time-to-first-token percentiles per route, pipeline stage latency,
  SecurityLingua flags, SeCom memory retrievals, worker health and upstream errors.
- `tessera / Workers`: vLLM's own metrics per worker (`instance`): latency percentiles (E2E,
  TTFT, inter-token), queue depth, KV cache usage, prefix cache hits, token throughput.

Metric names, label names and template variables follow vLLM's own dashboards
(`examples/observability/dashboards/grafana/` in vLLM: variables `datasource`, `job`,
`model_name`, `instance`; selectors `{job=~"$job", model_name=~"$model_name",
instance=~"$instance"}`), so their panels and ours can sit on one Grafana.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import common as gcommon_builders
from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus as gprom
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as gcommon
from grafana_foundation_sdk.models import dashboard as gmodel

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = gmodel.DataSourceRef(type_val="prometheus", uid="${datasource}")
QUANTILES = (0.5, 0.95, 0.99)

# Selectors, as in vLLM's dashboards (workers) and the gateway's equivalent.
VLLM = 'job=~"$job", model_name=~"$model_name", instance=~"$instance"'
GATEWAY = 'job=~"$gateway_job"'
# tessera's own worker metrics (attention_backends/worker_metrics.py) carry no model_name.
TESSERA_WORKER = 'job=~"$job", instance=~"$instance"'
# Client traffic only: Prometheus' scrapes and health probes are counted by the gateway too.
GATEWAY_ROUTE = 'job=~"$gateway_job", route=~"$route", route!~"health|metrics"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = "__auto"


@dataclass(frozen=True)
class PanelSpec:
    """One panel: a title, what it shows (description), its queries, unit and kind."""

    title: str
    description: str
    queries: Sequence[Query]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    width: int = 8
    height: int = 8


@dataclass(frozen=True)
class RowSpec:
    title: str
    panels: Sequence[PanelSpec] = field(default_factory=tuple)


def quantiles(metric: str, selector: str, by: str, what: str) -> list[Query]:
    """p50/p95/p99 of a histogram, one series per value of label `by`."""
    return [
        Query(
            f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            f"p{round(q * 100)} {what} {{{{{by}}}}}",
        )
        for q in QUANTILES
    ]


def gateway_rows() -> list[RowSpec]:
    requests = f"tessera_requests_total{{{GATEWAY_ROUTE}}}"
    return [
        RowSpec(
            "Traffic",
            [
                PanelSpec(
                    "Requests / s",
                    "Requests answered by the gateway, all routes.",
                    [Query(f"sum(rate({requests}[$__rate_interval]))", "requests/s")],
                    unit="reqps",
                    kind="stat",
                    width=6,
                    height=4,
                ),
                PanelSpec(
                    "Error ratio",
                    "Share of requests answered with a 4xx or 5xx status.",
                    [
                        Query(
                            f'(sum(rate(tessera_requests_total{{{GATEWAY_ROUTE}, status=~"[45].."}}'
                            f"[$__rate_interval])) or vector(0)) / "
                            f"(sum(rate({requests}[$__rate_interval])) > 0)",
                            "errors",
                        )
                    ],
                    unit="percentunit",
                    kind="stat",
                    width=6,
                    height=4,
                ),
                PanelSpec(
                    "Healthy workers",
                    "Workers passing the gateway's health checks.",
                    [Query(f"sum(tessera_worker_healthy{{{GATEWAY}}})", "healthy")],
                    unit="none",
                    kind="stat",
                    width=6,
                    height=4,
                ),
                PanelSpec(
                    "In flight",
                    "Requests the gateway is forwarding right now.",
                    [Query(f"sum(tessera_worker_outstanding_requests{{{GATEWAY}}})", "in flight")],
                    unit="none",
                    kind="stat",
                    width=6,
                    height=4,
                ),
                PanelSpec(
                    "Requests by route and status",
                    "Rate of answered requests per route and HTTP status.",
                    [
                        Query(
                            f"sum by (route, status) (rate({requests}[$__rate_interval]))",
                            "{{route}} {{status}}",
                        )
                    ],
                    unit="reqps",
                    width=12,
                ),
                PanelSpec(
                    "Upstream errors by worker",
                    "Failed attempts to reach a worker (connect "
                    "errors, timeouts, 5xx), which the router retries on another worker.",
                    [
                        Query(
                            "sum by (worker, kind) (rate("
                            f"tessera_upstream_errors_total{{{GATEWAY}}}"
                            f"[$__rate_interval]))",
                            "{{worker}} {{kind}}",
                        )
                    ],
                    unit="reqps",
                    width=12,
                ),
            ],
        ),
        RowSpec(
            "Latency",
            [
                PanelSpec(
                    "End-to-end latency by route",
                    "Gateway request latency, arrival to last byte, percentiles per route.",
                    quantiles("tessera_request_duration_seconds", GATEWAY_ROUTE, "route", "e2e"),
                    unit="s",
                    width=12,
                ),
                PanelSpec(
                    "Time to first token by route",
                    "Arrival at the gateway to the first streamed "
                    "chunk leaving it (streaming requests), percentiles per route.",
                    quantiles(
                        "tessera_time_to_first_token_seconds", GATEWAY_ROUTE, "route", "TTFT"
                    ),
                    unit="s",
                    width=12,
                ),
            ],
        ),
        RowSpec(
            "Prompt pipeline",
            [
                PanelSpec(
                    "Pipeline stage latency (p95)",
                    "Time in each request pipeline stage (SecurityLingua, SeCom retrieval, ...); "
                    "`total` is the whole pipeline.",
                    [
                        Query(
                            "histogram_quantile(0.95, sum by (le, stage) (rate("
                            f"tessera_pipeline_stage_seconds_bucket{{{GATEWAY}}}"
                            "[$__rate_interval])))",
                            "{{stage}}",
                        )
                    ],
                    unit="s",
                ),
                PanelSpec(
                    "SecurityLingua flags / s",
                    "Requests whose extracted intention was added to the system prompt.",
                    [
                        Query(
                            f"sum(rate(tessera_securitylingua_flagged_total{{{GATEWAY}}}"
                            "[$__rate_interval]))",
                            "flagged/s",
                        )
                    ],
                    unit="reqps",
                ),
                PanelSpec(
                    "Memory units retrieved per request",
                    "SeCom memory units added to a request: mean and p95.",
                    [
                        Query(
                            f"sum(rate(tessera_memory_units_retrieved_sum{{{GATEWAY}}}"
                            f"[$__rate_interval])) / clamp_min(sum(rate("
                            f"tessera_memory_units_retrieved_count{{{GATEWAY}}}[$__rate_interval])),"
                            " 1e-9)",
                            "mean",
                        ),
                        Query(
                            "histogram_quantile(0.95, sum by (le) (rate("
                            f"tessera_memory_units_retrieved_bucket{{{GATEWAY}}}"
                            "[$__rate_interval])))",
                            "p95",
                        ),
                    ],
                    unit="none",
                ),
            ],
        ),
    ]


def worker_rows() -> list[RowSpec]:
    return [
        RowSpec(
            "Traffic and queue",
            [
                PanelSpec(
                    "Finished requests / s by worker",
                    "vLLM requests finished per second, any finish reason.",
                    [
                        Query(
                            f"sum by (instance) (rate(vllm:request_success_total{{{VLLM}}}"
                            "[$__rate_interval]))",
                            "{{instance}}",
                        )
                    ],
                    unit="reqps",
                ),
                PanelSpec(
                    "Queue depth by worker",
                    "Requests running in the engine and waiting in its scheduler queue.",
                    [
                        Query(
                            f"sum by (instance) (vllm:num_requests_running{{{VLLM}}})",
                            "running {{instance}}",
                        ),
                        Query(
                            f"sum by (instance) (vllm:num_requests_waiting{{{VLLM}}})",
                            "waiting {{instance}}",
                        ),
                    ],
                    unit="none",
                ),
                PanelSpec(
                    "Token throughput by worker",
                    "Prompt and generated tokens per second.",
                    [
                        Query(
                            f"sum by (instance) (rate(vllm:prompt_tokens_total{{{VLLM}}}"
                            "[$__rate_interval]))",
                            "prompt {{instance}}",
                        ),
                        Query(
                            f"sum by (instance) (rate(vllm:generation_tokens_total{{{VLLM}}}"
                            "[$__rate_interval]))",
                            "generated {{instance}}",
                        ),
                    ],
                    unit="short",
                ),
            ],
        ),
        RowSpec(
            "Latency",
            [
                PanelSpec(
                    "End-to-end latency by worker",
                    "vLLM request latency, arrival to last token.",
                    quantiles("vllm:e2e_request_latency_seconds", VLLM, "instance", "e2e"),
                    unit="s",
                ),
                PanelSpec(
                    "Time to first token by worker",
                    "Queueing, prefill and the first decode step.",
                    quantiles("vllm:time_to_first_token_seconds", VLLM, "instance", "TTFT"),
                    unit="s",
                ),
                PanelSpec(
                    "Inter-token latency by worker",
                    "Time between consecutive output tokens.",
                    quantiles("vllm:inter_token_latency_seconds", VLLM, "instance", "ITL"),
                    unit="s",
                ),
            ],
        ),
        RowSpec(
            "KV cache",
            [
                PanelSpec(
                    "KV cache usage by worker",
                    "Share of the KV cache blocks in use (0-1).",
                    [
                        Query(
                            f"max by (instance) (vllm:kv_cache_usage_perc{{{VLLM}}})",
                            "{{instance}}",
                        )
                    ],
                    unit="percentunit",
                    width=12,
                ),
                PanelSpec(
                    "Prefix cache hit rate by worker",
                    "Prompt tokens found in the prefix cache over prompt tokens looked up.",
                    [
                        Query(
                            f"sum by (instance) (rate(vllm:prefix_cache_hits_total{{{VLLM}}}"
                            f"[$__rate_interval])) / clamp_min(sum by (instance) (rate("
                            f"vllm:prefix_cache_queries_total{{{VLLM}}}[$__rate_interval])), 1)",
                            "{{instance}}",
                        )
                    ],
                    unit="percentunit",
                    width=12,
                ),
            ],
        ),
        RowSpec(
            "tessera: KV savings and attention paths",
            [
                PanelSpec(
                    "KV cache bytes by worker, stored vs dense",
                    "The KV pool as its pages store it and as a dense cache would need for "
                    "the same tokens (equal without LeanK; LeanK stores pruned K).",
                    [
                        Query(
                            "sum by (instance, kind, state) "
                            f"(tessera_kv_bytes{{{TESSERA_WORKER}}})",
                            "{{kind}} {{state}} {{instance}}",
                        )
                    ],
                    unit="bytes",
                    width=12,
                ),
                PanelSpec(
                    "Attention query tokens / s by path",
                    "Query tokens through each attention path of tessera's backend (dense, "
                    "a sparse prefill pattern, LeanK or RetroInfer decode), all layers.",
                    [
                        Query(
                            "sum by (path) (rate(tessera_attention_query_tokens_total"
                            f"{{{TESSERA_WORKER}}}[$__rate_interval]))",
                            "{{path}}",
                        )
                    ],
                    unit="short",
                    width=12,
                ),
            ],
        ),
    ]


def build_panel(spec: PanelSpec) -> gts.Panel | gstat.Panel:
    panel = gts.Panel() if spec.kind == "timeseries" else gstat.Panel()
    panel.title(spec.title).description(spec.description).datasource(DATASOURCE)
    panel.unit(spec.unit).span(spec.width).height(spec.height)
    for ref_id, query in zip("ABCDEFGH", spec.queries, strict=False):
        panel.with_target(
            gprom.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref_id)
        )
    if isinstance(panel, gts.Panel):
        panel.min(0).fill_opacity(10).legend(
            gcommon_builders.VizLegendOptions()
            .display_mode(gcommon.LegendDisplayMode.LIST)
            .placement(gcommon.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    return panel


def query_variable(name: str, label: str, query: str) -> gdash.QueryVariable:
    """A multi-select label_values() variable defaulting to All, as in vLLM's dashboards."""
    return (
        gdash.QueryVariable(name)
        .label(label)
        .query(query)
        .datasource(DATASOURCE)
        .refresh(gmodel.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(gmodel.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .current(gmodel.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


def build_dashboard(
    uid: str,
    title: str,
    description: str,
    rows: list[RowSpec],
    variables: list[gdash.QueryVariable],
) -> dict[str, object]:
    board = (
        gdash.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["tessera", "vllm"])
        .editable()
        .tooltip(gmodel.DashboardCursorSync.CROSSHAIR)
        .time("now-30m", "now")
        .refresh("10s")
        .with_variable(
            gdash.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
    )
    for variable in variables:
        board.with_variable(variable)
    for row in rows:
        board.with_row(gdash.Row(row.title))
        for spec in row.panels:
            board.with_panel(build_panel(spec))
    encoded = json.dumps(board.build(), cls=JSONEncoder, sort_keys=True)
    return json.loads(encoded)


def dashboards() -> dict[str, dict[str, object]]:
    """File name -> dashboard JSON, for every dashboard we ship."""
    gateway_job = query_variable(
        "gateway_job", "Gateway job", "label_values(tessera_requests_total, job)"
    )
    route = query_variable(
        "route", "Route", 'label_values(tessera_requests_total{job=~"$gateway_job"}, route)'
    )
    job = query_variable("job", "Job", "label_values(vllm:num_requests_running, job)")
    model = query_variable(
        "model_name", "Model", 'label_values(vllm:num_requests_running{job=~"$job"}, model_name)'
    )
    instance = query_variable(
        "instance",
        "Instance",
        'label_values(vllm:num_requests_running{job=~"$job", model_name=~"$model_name"}, instance)',
    )
    return {
        "tessera_overview.json": build_dashboard(
            "tessera-gateway",
            "tessera / Gateway",
            "What clients of the tessera gateway see: traffic, errors, latency per route, "
            "prompt pipeline stages, worker health.",
            gateway_rows(),
            [gateway_job, route],
        ),
        "tessera_workers.json": build_dashboard(
            "tessera-workers",
            "tessera / Workers",
            "vLLM workers behind the gateway: latency per worker, queue depth, KV cache.",
            worker_rows(),
            [job, model, instance],
        ),
    }


def render(board: dict[str, object]) -> str:
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--out", type=Path, default=DASHBOARD_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name, board in dashboards().items():
        path = args.out / name
        text = render(board)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print(f"stale dashboards (run deploy/grafana/generate.py): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
