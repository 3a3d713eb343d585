"""The Grafana dashboards are generated, schema-valid, and use vLLM's names and variables.

Schema validity is checked with grafana-foundation-sdk (Grafana's own generated models): each
dashboard is decoded into the Dashboard model, panel options and queries through the panel
and data source plugins' models, and encoded again. A key that Grafana's schema does not know
is dropped on the way, so the round trip must give back the committed JSON unchanged. Live
evaluation against Prometheus is in tests/compose/.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
sdk = pytest.importorskip("grafana_foundation_sdk")

sys.path.insert(0, str(GRAFANA))
import generate  # noqa: E402
import preview  # noqa: E402
from grafana_foundation_sdk.cog.encoder import JSONEncoder  # noqa: E402
from grafana_foundation_sdk.cog.plugins import register_default_plugins  # noqa: E402
from grafana_foundation_sdk.models.dashboard import Dashboard  # noqa: E402

register_default_plugins()
COMMITTED = preview.load_dashboards(GRAFANA / "dashboards")


def round_trip(board: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(Dashboard.from_json(board), cls=JSONEncoder))


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    generated = generate.dashboards()
    assert sorted(generated) == sorted(COMMITTED)
    for name, board in generated.items():
        assert generate.render(board) == (GRAFANA / "dashboards" / name).read_text(), name


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_dashboard_round_trips_through_grafana_schema_models(name: str) -> None:
    assert round_trip(COMMITTED[name]) == COMMITTED[name]


def test_round_trip_catches_a_key_grafana_does_not_know() -> None:
    board = copy.deepcopy(next(iter(COMMITTED.values())))
    panel = preview.panels(board)[0]
    panel["targets"][0]["exprr"] = panel["targets"][0].pop("expr")
    assert round_trip(board) != board


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_every_panel_queries_prometheus_through_the_datasource_variable(name: str) -> None:
    board = COMMITTED[name]
    names = [v["name"] for v in board["templating"]["list"]]
    assert names[0] == "datasource"
    for panel in preview.panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert preview.metric_names(target["expr"]), target["expr"]


def test_worker_dashboard_uses_vllm_dashboard_variables_and_selectors() -> None:
    board = COMMITTED["tessera_workers.json"]
    variables = [v["name"] for v in board["templating"]["list"]]
    assert variables == ["datasource", "job", "model_name", "instance"]
    for panel in preview.panels(board):
        for target in panel["targets"]:
            # tessera's own worker metrics carry no model_name label (worker_metrics.py).
            selector = ('job=~"$job", instance=~"$instance"' if "tessera_" in target["expr"]
                        else 'job=~"$job", model_name=~"$model_name", instance=~"$instance"')
            assert selector in target["expr"]


def test_dashboards_read_only_current_vllm_metric_names() -> None:
    # Removed in vLLM (PR #29330): gpu_cache_usage_perc, gpu_prefix_cache_*,
    # time_per_output_token_seconds.
    removed = ("gpu_cache_usage_perc", "gpu_prefix_cache", "time_per_output_token_seconds")
    for board in COMMITTED.values():
        for panel in preview.panels(board):
            for target in panel["targets"]:
                assert not any(old in target["expr"] for old in removed), target["expr"]


def test_grafana_variables_expand_as_for_an_all_selection() -> None:
    expr = 'rate(x{job=~"$job", instance=~"$instance"}[$__rate_interval])'
    expanded = preview.substitute(expr, {"job": ".*", "instance": ".*"})
    assert expanded == f'rate(x{{job=~".*", instance=~".*"}}[{preview.RATE_INTERVAL}])'
