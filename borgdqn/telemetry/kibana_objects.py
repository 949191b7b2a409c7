"""Kibana saved objects of the "Borg collective" dashboard, built from one table of panels.

The objects are data views (``index-pattern``, one per telemetry index, time field ``@timestamp``), one Lens
visualization per panel and the dashboard that places them. They are built here, in Python, rather than kept
only as a hand-written file, because:

- the light image (memory monitor, indexer, ``borgdqn kibana-setup``) installs the package as a wheel, which
  carries Python modules only; the Job builds the NDJSON it imports from this module;
- every panel is a few lines of :data:`PANELS` (index, x, split, metrics), not 80 lines of nested Lens JSON;
- the repository's ``kibana/borg-collective.ndjson`` (for an import by hand: Stack Management > Saved objects)
  is written by ``python -m borgdqn.telemetry.kibana_objects`` and a test checks it is what this module builds.

The Lens state is the 8.9+ shape (``datasourceStates.formBased``); objects carry ``typeMigrationVersion`` so
that newer Kibanas migrate them forward. Kibana 8.9 or newer imports them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from borgdqn.telemetry.documents import FIELDS, SHARES_INDEX
from borgdqn.telemetry.events import INDICES

__all__ = ["DASHBOARD_ID", "DASHBOARD_TITLE", "PANELS", "Metric", "Panel", "data_view_id", "ndjson",
           "saved_objects"]

DASHBOARD_ID = "borgdqn-borg-collective"
DASHBOARD_TITLE = "Borg collective"
TIME_FIELD = "@timestamp"
CORE_MIGRATION_VERSION = "8.8.0"
TYPE_MIGRATION_VERSION = {"index-pattern": "7.11.0", "lens": "8.9.0", "dashboard": "8.9.0"}
PANEL_VERSION = "8.9.0"
LAYER_ID = "layer-0"
AGENTS_SHOWN = 64  # terms size of a split by agent: a hive larger than this shows its 64 first agents
SOURCES_SHOWN = 20
REPO_NDJSON = Path("kibana") / "borg-collective.ndjson"

MetricOp = Literal["average", "max", "min", "sum", "median", "last_value"]
XOp = Literal["date_histogram", "range", "terms"]
SeriesType = Literal["line", "area", "area_stacked", "bar", "bar_stacked", "bar_horizontal"]

DATA_VIEW_NAMES = {
    INDICES["episode"]: "Borg episodes",
    INDICES["training"]: "Borg training",
    INDICES["memory"]: "Borg replay memory",
    SHARES_INDEX: "Borg memory shares",
    INDICES["drops"]: "Borg dropped events",
    INDICES["assimilation"]: "Borg assimilations",
}


@dataclass(frozen=True)
class Metric:
    op: MetricOp
    field: str
    label: str
    axis: Literal["left", "right"] = "left"


@dataclass(frozen=True)
class Panel:
    """One Lens XY chart: ``x`` buckets (a date histogram on ``@timestamp``, a number histogram, or terms), an
    optional ``split`` into one series per value (terms), and the ``metrics`` drawn per bucket."""

    id: str
    title: str
    description: str
    index: str
    metrics: tuple[Metric, ...]
    x: tuple[XOp, str] = ("date_histogram", TIME_FIELD)
    split: str | None = None
    series: SeriesType = "line"
    width: int = 24
    height: int = 15
    split_size: int = AGENTS_SHOWN


EPISODE, TRAINING, MEMORY, DROPS = INDICES["episode"], INDICES["training"], INDICES["memory"], INDICES["drops"]
ASSIMILATION = INDICES["assimilation"]

PANELS: tuple[Panel, ...] = (
    Panel("returns-per-agent", "Return per agent over env steps",
          "Mean raw episode return per agent, by the agent's own env steps", EPISODE,
          (Metric("average", "episode_return", "episode return"),), x=("range", "env_steps"), split="agent"),
    Panel("hive-return", "Hive: best and mean return",
          "Best mean-of-20 return of any agent, and the mean over agents of their last-20 mean return", TRAINING,
          (Metric("max", "best_mean_return", "best mean return"), Metric("average", "mean_return", "mean return"))),
    Panel("returns-per-policy", "Return by acting policy",
          "Mean raw episode return of the games each acting policy played (a mixture's components apart)", EPISODE,
          (Metric("average", "episode_return", "episode return"),), x=("range", "env_steps"), split="policy"),
    Panel("episodes-per-agent", "Episodes played per agent", "Games each agent has finished so far", EPISODE,
          (Metric("max", "episode", "episodes"),), split="agent"),
    Panel("assimilations", "Assimilations: who adopted whom",
          "Each assimilation: the agent that adopted (series) and the donor whose networks it took (value); the "
          "donor's and the agent's mean return are in the Borg assimilations data view", ASSIMILATION,
          (Metric("max", "donor", "donor"),), split="agent", series="bar"),
    Panel("epsilon-per-agent", "Epsilon per agent", "Exploration rate of each agent's acting policy", TRAINING,
          (Metric("average", "epsilon", "epsilon"),), split="agent"),
    Panel("loss-per-agent", "Loss", "Mean Huber loss of each agent's updates", TRAINING,
          (Metric("average", "loss", "loss"),), split="agent"),
    Panel("env-steps-per-s", "Env steps/s per agent", "Acting speed of each agent (stacked: the hive's total)",
          TRAINING, (Metric("average", "env_steps_per_s", "env steps/s"),), split="agent", series="area_stacked"),
    Panel("memory-size", "Replay memory: size and growth",
          "Steps stored and the memory's capacity (left), steps inserted and sampled per second (right)", MEMORY,
          (Metric("max", "size", "size (steps)"), Metric("max", "capacity", "capacity (steps)"),
           Metric("average", "insert_rate", "inserted/s", axis="right"),
           Metric("average", "sample_rate", "sampled/s", axis="right"))),
    Panel("memory-bytes", "Replay memory: bytes",
          "Bytes the memory holds (the shared segment on one machine; Redis used_memory in a collective)", MEMORY,
          (Metric("max", "bytes_used", "bytes"),)),
    Panel("memory-shares", "Per-agent share of the memory", "Each agent's share of the steps stored now",
          SHARES_INDEX, (Metric("average", "share", "share"),), split="agent", series="area_stacked"),
    Panel("dropped-events", "Dropped telemetry events",
          "Events each source dropped while Kafka was away (counted since the source started); empty is good",
          DROPS, (Metric("max", "dropped_events", "dropped events"),), x=("terms", "source_id"),
          series="bar_horizontal", split_size=SOURCES_SHOWN),
)


def data_view_id(index: str) -> str:
    return f"borgdqn-{index}"


def _meta(obj_type: str) -> dict[str, Any]:
    return {"coreMigrationVersion": CORE_MIGRATION_VERSION, "typeMigrationVersion": TYPE_MIGRATION_VERSION[obj_type],
            "managed": False}


def _data_view(index: str) -> dict[str, Any]:
    return {
        "id": data_view_id(index),
        "type": "index-pattern",
        "attributes": {"title": index, "name": DATA_VIEW_NAMES[index], "timeFieldName": TIME_FIELD,
                       "fields": "[]", "fieldAttrs": "{}", "runtimeFieldMap": "{}", "typeMeta": "{}",
                       "allowNoIndex": True},
        "references": [],
        **_meta("index-pattern"),
    }


def _data_type(index: str, name: str) -> str:
    es_type = FIELDS[index][name]
    return {"date": "date", "keyword": "string"}.get(es_type, "number")


def _terms(index: str, name: str, size: int, order_by: dict[str, Any], direction: str) -> dict[str, Any]:
    return {
        "label": f"Top {size} values of {name}", "dataType": _data_type(index, name), "operationType": "terms",
        "sourceField": name, "isBucketed": True, "scale": "ordinal",
        "params": {"size": size, "orderBy": order_by, "orderDirection": direction, "otherBucket": False,
                   "missingBucket": False, "parentFormat": {"id": "terms"}, "include": [], "exclude": [],
                   "includeIsRegex": False, "excludeIsRegex": False},
    }


def _x_column(panel: Panel) -> dict[str, Any]:
    op, name = panel.x
    if op == "date_histogram":
        return {"label": name, "dataType": "date", "operationType": "date_histogram", "sourceField": name,
                "isBucketed": True, "scale": "interval",
                "params": {"interval": "auto", "includeEmptyRows": False, "dropPartials": False}}
    if op == "range":
        return {"label": name, "dataType": "number", "operationType": "range", "sourceField": name,
                "isBucketed": True, "scale": "interval",
                "params": {"type": "histogram", "maxBars": "auto", "includeEmptyRows": False,
                           "ranges": [{"from": 0, "to": 1000, "label": ""}]}}
    # terms on the x axis: the largest values first
    return _terms(panel.index, name, panel.split_size, {"type": "column", "columnId": "m0"}, "desc")


def _metric_column(panel: Panel, metric: Metric) -> dict[str, Any]:
    column: dict[str, Any] = {
        "label": metric.label, "customLabel": True, "dataType": "number", "operationType": metric.op,
        "sourceField": metric.field, "isBucketed": False, "scale": "ratio",
        "params": {"emptyAsNull": True},
    }
    if metric.op == "last_value":
        column["params"] = {"sortField": TIME_FIELD, "showArrayValues": False}
        column["filter"] = {"query": f'"{metric.field}": *', "language": "kuery"}
    return column


def _lens(panel: Panel) -> dict[str, Any]:
    metric_ids = [f"m{i}" for i in range(len(panel.metrics))]
    columns: dict[str, Any] = {}
    order: list[str] = []
    if panel.split is not None:
        columns["split"] = _terms(panel.index, panel.split, panel.split_size, {"type": "alphabetical",
                                                                               "fallback": False}, "asc")
        order.append("split")
    columns["x"] = _x_column(panel)
    order.append("x")
    for cid, metric in zip(metric_ids, panel.metrics, strict=True):
        columns[cid] = _metric_column(panel, metric)
        order.append(cid)
    layer: dict[str, Any] = {
        "layerId": LAYER_ID, "layerType": "data", "seriesType": panel.series, "xAccessor": "x",
        "accessors": metric_ids,
        "yConfig": [{"forAccessor": cid, "axisMode": m.axis} for cid, m in zip(metric_ids, panel.metrics,
                                                                               strict=True)],
    }
    if panel.split is not None:
        layer["splitAccessor"] = "split"
    visualization = {
        "legend": {"isVisible": True, "position": "right"},
        "valueLabels": "hide",
        "fittingFunction": "Linear",
        "preferredSeriesType": panel.series,
        "axisTitlesVisibilitySettings": {"x": True, "yLeft": True, "yRight": True},
        "layers": [layer],
    }
    return {
        "id": f"borgdqn-lens-{panel.id}",
        "type": "lens",
        "attributes": {
            "title": panel.title,
            "description": panel.description,
            "visualizationType": "lnsXY",
            "state": {
                "datasourceStates": {"formBased": {"layers": {LAYER_ID: {
                    "columns": columns, "columnOrder": order, "incompleteColumns": {}}}}},
                "visualization": visualization,
                "query": {"query": "", "language": "kuery"},
                "filters": [],
                "internalReferences": [],
                "adHocDataViews": {},
            },
        },
        "references": [{"type": "index-pattern", "id": data_view_id(panel.index),
                        "name": f"indexpattern-datasource-layer-{LAYER_ID}"}],
        **_meta("lens"),
    }


def _dashboard(lenses: list[dict[str, Any]]) -> dict[str, Any]:
    panels_json: list[dict[str, Any]] = []
    references: list[dict[str, Any]] = []
    x = y = 0
    row_height = 0
    for n, (panel, lens) in enumerate(zip(PANELS, lenses, strict=True), start=1):
        if x + panel.width > 48:
            x, y, row_height = 0, y + row_height, 0
        index = f"p{n}"
        panels_json.append({
            "version": PANEL_VERSION, "type": "lens",
            "gridData": {"x": x, "y": y, "w": panel.width, "h": panel.height, "i": index},
            "panelIndex": index, "embeddableConfig": {"enhancements": {}}, "panelRefName": f"panel_{index}",
        })
        references.append({"type": "lens", "id": lens["id"], "name": f"{index}:panel_{index}"})
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "id": DASHBOARD_ID,
        "type": "dashboard",
        "attributes": {
            "title": DASHBOARD_TITLE,
            "description": "A Borg-DQN hive: returns, exploration, learning, speed, the shared replay memory and "
                           "telemetry drops. Filter one collective with collective : \"NAME\".",
            "panelsJSON": json.dumps(panels_json, separators=(",", ":")),
            "optionsJSON": json.dumps({"useMargins": True, "syncColors": True, "syncCursor": True,
                                       "syncTooltips": False, "hidePanelTitles": False}, separators=(",", ":")),
            "timeRestore": True,
            "timeFrom": "now-1h",
            "timeTo": "now",
            "refreshInterval": {"pause": False, "value": 10_000},
            "version": 1,
            "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(
                {"query": {"query": "", "language": "kuery"}, "filter": []}, separators=(",", ":"))},
        },
        "references": references,
        **_meta("dashboard"),
    }


def saved_objects() -> list[dict[str, Any]]:
    """Every saved object, referenced ones first: data views, the Lens visualizations, the dashboard."""
    views = [_data_view(index) for index in FIELDS]
    lenses = [_lens(panel) for panel in PANELS]
    return [*views, *lenses, _dashboard(lenses)]


def ndjson() -> bytes:
    """The saved objects as Kibana's import format: one JSON object per line (keys sorted: stable diffs)."""
    return "".join(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"
                   for obj in saved_objects()).encode()


def main(argv: list[str] | None = None) -> int:
    """``python -m borgdqn.telemetry.kibana_objects [PATH]``: (re)write the repository's NDJSON file."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else REPO_NDJSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ndjson())
    print(f"{path}: {len(saved_objects())} saved objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
