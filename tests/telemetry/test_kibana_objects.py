"""The Kibana dashboard's contract: the committed NDJSON, its references, and its fields and aggregations.

The unit tests read ``kibana/borg-collective.ndjson`` (the file a person imports, and what ``kibana-setup``
sends: both are ``kibana_objects.ndjson()``): it parses, every reference resolves, every field a Lens column
uses exists in the index mappings (``documents.FIELDS``) with a type its operation accepts.

The integration test installs the index templates in the real Elasticsearch of the harness, indexes a small
hive's telemetry built as the indexer builds it (``documents(event)`` of real protobuf events), and runs, for
every visualization, the aggregation its Lens layer implies (translated below: date histogram / histogram /
terms buckets, nested in column order, with the metric columns inside): each must return non-empty buckets
with non-null values. Kibana itself cannot run here; this is how its queries are reproduced.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.telemetry.documents import FIELDS, documents, index_templates
from borgdqn.telemetry.events import Source, header
from borgdqn.telemetry.kibana_objects import DASHBOARD_ID, DASHBOARD_TITLE, REPO_NDJSON, ndjson

ROOT = Path(__file__).resolve().parents[2]
NDJSON = ROOT / REPO_NDJSON
NUMERIC = {"long", "integer", "short", "byte", "double", "float", "half_float", "scaled_float"}
# What each Lens operation accepts, as Elasticsearch field types.
ACCEPTS: dict[str, set[str]] = {
    "date_histogram": {"date"},
    "range": NUMERIC,
    "terms": NUMERIC | {"keyword"},
    "average": NUMERIC, "max": NUMERIC, "min": NUMERIC, "sum": NUMERIC, "median": NUMERIC,
    "last_value": NUMERIC | {"keyword", "date"},
}
LENS_DATA_TYPE = {"date": "date", "keyword": "string", **{t: "number" for t in NUMERIC}}


def load_objects() -> list[dict[str, Any]]:
    lines = NDJSON.read_text().splitlines()
    objects = [json.loads(line) for line in lines]
    assert all(isinstance(obj, dict) for obj in objects)
    return objects


def lens_objects() -> list[dict[str, Any]]:
    return [obj for obj in load_objects() if obj["type"] == "lens"]


def layers(lens: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return lens["attributes"]["state"]["datasourceStates"]["formBased"]["layers"]


def layer_index(lens: dict[str, Any], layer_id: str) -> str:
    """The index a Lens layer queries: its data view reference, resolved to the data view's title."""
    by_id = {(o["type"], o["id"]): o for o in load_objects()}
    [ref] = [r for r in lens["references"] if r["name"] == f"indexpattern-datasource-layer-{layer_id}"]
    return str(by_id[(ref["type"], ref["id"])]["attributes"]["title"])


# ------------------------------------------------------------------------------------------- the file itself
def test_committed_ndjson_is_what_the_package_builds() -> None:
    assert NDJSON.read_bytes() == ndjson(), "kibana/borg-collective.ndjson is stale: run `python tools/regenerate.py`"


def test_ndjson_parses_into_unique_saved_objects() -> None:
    objects = load_objects()
    keys = [(o["type"], o["id"]) for o in objects]
    assert len(keys) == len(set(keys))
    for obj in objects:
        assert {"id", "type", "attributes", "references", "coreMigrationVersion", "typeMigrationVersion"} <= set(obj)
    types = [o["type"] for o in objects]
    assert types.count("dashboard") == 1 and types.count("index-pattern") == len(FIELDS)
    # Referenced objects come before the objects that reference them (Kibana resolves them in one import).
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        assert {(r["type"], r["id"]) for r in obj["references"]} <= seen, obj["id"]
        seen.add((obj["type"], obj["id"]))


def test_data_views_cover_every_index_with_the_timestamp_as_time_field() -> None:
    views = [o for o in load_objects() if o["type"] == "index-pattern"]
    assert {v["attributes"]["title"] for v in views} == set(FIELDS)
    for view in views:
        time_field = view["attributes"]["timeFieldName"]
        assert FIELDS[view["attributes"]["title"]][time_field] == "date"


def test_every_reference_resolves() -> None:
    objects = load_objects()
    present = {(o["type"], o["id"]) for o in objects}
    for obj in objects:
        for ref in obj["references"]:
            assert (ref["type"], ref["id"]) in present, f"{obj['id']}: {ref} points at nothing"
        names = [r["name"] for r in obj["references"]]
        assert len(names) == len(set(names)), obj["id"]
    for lens in lens_objects():
        names = {r["name"] for r in lens["references"]}
        for layer_id in layers(lens):
            assert f"indexpattern-datasource-layer-{layer_id}" in names
    [dash] = [o for o in objects if o["type"] == "dashboard"]
    names = {r["name"]: r for r in dash["references"]}
    panels = json.loads(dash["attributes"]["panelsJSON"])
    for panel in panels:
        ref = names[f"{panel['panelIndex']}:{panel['panelRefName']}"]
        assert ref["type"] == panel["type"] == "lens"
    assert len(panels) == len(lens_objects()) == len(dash["references"])  # every visualization is shown


def test_dashboard_is_borg_collective_with_panels_on_the_grid() -> None:
    [dash] = [o for o in load_objects() if o["type"] == "dashboard"]
    assert dash["id"] == DASHBOARD_ID and dash["attributes"]["title"] == DASHBOARD_TITLE == "Borg collective"
    cells: set[tuple[int, int]] = set()
    for panel in json.loads(dash["attributes"]["panelsJSON"]):
        g = panel["gridData"]
        assert g["i"] == panel["panelIndex"] and g["x"] >= 0 and g["x"] + g["w"] <= 48
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {g['i']} overlaps another"
        cells |= area
    json.loads(dash["attributes"]["optionsJSON"])
    json.loads(dash["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])


def test_every_field_a_visualization_uses_exists_with_a_type_its_operation_accepts() -> None:
    for lens in lens_objects():
        for layer_id, layer in layers(lens).items():
            index = layer_index(lens, layer_id)
            assert set(layer["columnOrder"]) == set(layer["columns"])
            for cid, col in layer["columns"].items():
                field = col["sourceField"]
                assert field in FIELDS[index], f"{lens['id']}: {index} has no field {field}"
                es_type = FIELDS[index][field]
                op = col["operationType"]
                assert es_type in ACCEPTS[op], f"{lens['id']}/{cid}: {op} on {es_type}"
                assert col["dataType"] == LENS_DATA_TYPE[es_type], f"{lens['id']}/{cid}"
        # The chart draws the columns it defines.
        columns = {cid for layer in layers(lens).values() for cid in layer["columns"]}
        for vis_layer in lens["attributes"]["state"]["visualization"]["layers"]:
            drawn = {vis_layer["xAccessor"], *vis_layer["accessors"], vis_layer.get("splitAccessor", "x")}
            assert drawn <= columns and vis_layer["layerId"] in layers(lens)


def test_the_dashboard_shows_every_view_the_issue_names() -> None:
    used = {(layer_index(lens, lid), col["sourceField"], col["operationType"])
            for lens in lens_objects() for lid, layer in layers(lens).items() for col in layer["columns"].values()}
    wanted = [
        ("borg-episode", "episode_return"), ("borg-episode", "env_steps"), ("borg-episode", "agent"),  # per agent
        ("borg-training", "best_mean_return"), ("borg-training", "mean_return"),  # the hive's best and mean
        ("borg-training", "epsilon"), ("borg-training", "loss"), ("borg-training", "env_steps_per_s"),
        ("borg-memory", "size"), ("borg-memory", "insert_rate"),  # size and growth
        ("borg-memory-shares", "share"), ("borg-memory-shares", "agent"), ("borg-drops", "dropped_events"),
    ]
    for index, field in wanted:
        assert any(i == index and f == field for i, f, _ in used), (index, field)


# ------------------------------------------------------------------------- the aggregations, in Elasticsearch
def _bucket_agg(col: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    op, field, params = col["operationType"], col["sourceField"], col.get("params", {})
    if op == "date_histogram":  # Lens's "auto" picks an interval from the time range; a minute fits the data
        return {"date_histogram": {"field": field, "fixed_interval": "1m", "min_doc_count": 1}}
    if op == "range":
        assert params["type"] == "histogram"
        return {"histogram": {"field": field, "interval": 500, "min_doc_count": 1}}
    assert op == "terms"
    order_by = params["orderBy"]
    if order_by["type"] == "column":
        assert order_by["columnId"] in layer["columns"]
        order = {order_by["columnId"]: params["orderDirection"]}
    else:
        order = {"_key": params["orderDirection"]}
    return {"terms": {"field": field, "size": params["size"], "order": order}}


def _metric_agg(col: dict[str, Any]) -> dict[str, Any]:
    op, field = col["operationType"], col["sourceField"]
    if op == "last_value":
        return {"top_metrics": {"metrics": {"field": field}, "sort": {"@timestamp": "desc"}}}
    if op == "median":
        return {"percentiles": {"field": field, "percents": [50]}}
    return {{"average": "avg"}.get(op, op): {"field": field}}


def _metric_value(result: dict[str, Any]) -> Any:
    if "top" in result:
        return next(iter(result["top"][0]["metrics"].values())) if result["top"] else None
    if "values" in result:
        return result["values"].get("50.0")
    return result.get("value")


def lens_to_es(layer: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """A Lens layer's query: its bucket columns nested in column order, its metric columns in the innermost
    bucket (and next to a terms bucket ordered by them); returns (aggs, bucket ids, metric ids)."""
    cols = layer["columns"]
    buckets = [cid for cid in layer["columnOrder"] if cols[cid]["isBucketed"]]
    metrics = [cid for cid in layer["columnOrder"] if not cols[cid]["isBucketed"]]
    inner: dict[str, Any] = {cid: _metric_agg(cols[cid]) for cid in metrics}
    for cid in reversed(buckets):
        agg = _bucket_agg(cols[cid], layer)
        sub = dict(inner)
        for key in agg.get("terms", {}).get("order", {}):
            if key != "_key":
                sub.setdefault(key, _metric_agg(cols[key]))
        inner = {cid: {**agg, "aggs": sub}}
    return inner, buckets, metrics


def leaf_buckets(result: dict[str, Any], buckets: list[str]) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    if not buckets:
        yield (), result
        return
    for bucket in result[buckets[0]]["buckets"]:
        for keys, leaf in leaf_buckets(bucket, buckets[1:]):
            yield (bucket["key"], *keys), leaf


class Hive:
    """A small hive's telemetry, as the agents and the memory monitor send it: 2 agents, a few minutes."""

    def __init__(self, collective: str, start: float) -> None:
        self.collective = collective
        self.events: list[pb.TelemetryEvent] = []
        sources = {a: Source.new(collective, "agent", a) for a in (0, 1)}
        memory = Source.new(collective, "memory", 0)
        seqs: dict[str, int] = {}

        def add(source: Source, when: float, **payload: Any) -> None:
            seq = seqs.get(source.source_id, 0)
            seqs[source.source_id] = seq + 1
            self.events.append(pb.TelemetryEvent(header=header(source, seq, now=when), **payload))

        for k in range(12):
            when = start + 20.0 * k
            for agent, source in sources.items():
                steps = 400 * (k + 1) + 50 * agent
                add(source, when, episode=pb.EpisodeEvent(
                    agent=agent, policy="epsilon_greedy" if k % 2 else "random", episode_return=-21.0 + k + agent,
                    length=400, env_steps=steps, episode=k + 1, epsilon=max(0.1, 1.0 - 0.08 * k),
                    wall_seconds=20.0 * k))
                add(source, when + 5, training=pb.TrainingReport(
                    agent=agent, env_steps=steps, updates=100 * k, loss=1.0 / (k + 1), mean_q=0.1 * k,
                    learning_rate=1e-4, updates_per_s=25.0, env_steps_per_s=200.0 + agent, replay_sample_age=3e3,
                    epsilon=max(0.1, 1.0 - 0.08 * k), mean_return=-20.0 + k, best_mean_return=-20.0 + k,
                    wall_seconds=20.0 * k + 5))
            size = min(800 * (k + 1), 5000)
            add(memory, when + 10, memory=pb.MemoryReport(
                size=size, capacity=5000, inserted=800 * (k + 1), sampled=3200 * k, bytes_used=size * 7000,
                insert_rate=40.0, sample_rate=160.0, per_agent_steps={0: size // 2 + 10, 1: size // 2 - 10},
                wall_seconds=20.0 * k + 10))
        add(sources[1], start + 230, drops=pb.DropReport(dropped_events=7, first_dropped_seq=3,
                                                         last_dropped_seq=9))
        for agent, donor in ((0, 1), (1, 0)):
            add(sources[agent], start + 100 + agent, assimilation=pb.AssimilationEvent(
                agent=agent, donor=donor, env_steps=2000, mean_return=-19.0, donor_mean_return=-15.0,
                donor_env_steps=2000, learning_rate=1.25e-4, epsilon_floor=0.08, wall_seconds=100.0))


@pytest.fixture(scope="module")
def indexed(es_server: Any) -> Iterator[tuple[Any, Hive, float, float]]:
    from elasticsearch import Elasticsearch, helpers

    es = Elasticsearch(es_server.url, request_timeout=30)
    for name, body in index_templates().items():
        es.indices.put_index_template(name=name, **body)
    start = time.time() - 3600
    hive = Hive(f"kibana-contract-{uuid.uuid4().hex[:8]}", start)
    actions = [{"_op_type": "create", "_index": index, "_id": doc_id, "_source": body}
               for event in hive.events for index, doc_id, body in documents(event)]
    ok, errors = helpers.bulk(es, actions, refresh="wait_for", raise_on_error=False)
    assert not errors and ok == len(actions) > 0, errors
    try:
        yield es, hive, start - 60, start + 600
    finally:
        # By id: the harness's Elasticsearch (the integ-test zip) has no reindex module, so no _delete_by_query.
        helpers.bulk(es, [{"_op_type": "delete", "_index": a["_index"], "_id": a["_id"]} for a in actions],
                     refresh=True)
        es.close()


@pytest.mark.integration
def test_live_mappings_are_the_templates(indexed: tuple[Any, Hive, float, float]) -> None:
    es = indexed[0]
    for index, fields in FIELDS.items():
        mapping = es.indices.get_mapping(index=index)[index]["mappings"]
        assert {name: prop["type"] for name, prop in mapping["properties"].items()} == fields


@pytest.mark.integration
@pytest.mark.parametrize("lens_id", [o["id"] for o in lens_objects()])
def test_each_visualization_aggregation_returns_buckets(indexed: tuple[Any, Hive, float, float],
                                                         lens_id: str) -> None:
    es, hive, t0, t1 = indexed
    [lens] = [o for o in lens_objects() if o["id"] == lens_id]
    for layer_id, layer in layers(lens).items():
        index = layer_index(lens, layer_id)
        aggs, buckets, metrics = lens_to_es(layer)
        # Kibana's query: the dashboard's time range on the data view's time field, and the filter a user
        # sets to look at one collective (here: only this test's documents).
        query = {"bool": {"filter": [
            {"range": {"@timestamp": {"gte": int(t0 * 1000), "lte": int(t1 * 1000), "format": "epoch_millis"}}},
            {"term": {"collective": hive.collective}},
        ]}}
        result = es.search(index=index, size=0, query=query, aggs=aggs)
        leaves = list(leaf_buckets(result["aggregations"], buckets))
        assert leaves, f"{lens_id}: no buckets from {index}"
        for cid in metrics:
            values = [_metric_value(leaf[cid]) for _, leaf in leaves]
            assert any(v is not None for v in values), f"{lens_id}: metric {cid} is null in every bucket"
        split = [cid for cid in buckets if cid == "split"]
        if split:  # one series per agent: both agents of the test hive appear
            assert len({keys[buckets.index("split")] for keys, _ in leaves}) == 2, lens_id
