"""The Elasticsearch part: the 8.x Python client indexes and finds documents; nothing listens beyond loopback."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterator

import pytest
from elasticsearch import Elasticsearch

from tests.harness.elasticsearch import EsServer

pytestmark = pytest.mark.integration


@pytest.fixture
def es(es_server: EsServer) -> Iterator[Elasticsearch]:
    client = Elasticsearch(es_server.url, request_timeout=30)
    yield client
    client.close()


def test_index_and_search(es: Elasticsearch) -> None:
    index = f"harness-{uuid.uuid4().hex[:8]}"
    runs = [{"run": "alpha", "step": 1, "reward": 1.5}, {"run": "alpha", "step": 2, "reward": 2.5},
            {"run": "beta", "step": 1, "reward": -1.0}]
    try:
        for i, doc in enumerate(runs):
            es.index(index=index, id=str(i), document=doc, refresh=i == len(runs) - 1)
        found = es.search(index=index, query={"term": {"run.keyword": "alpha"}}, sort=[{"step": "asc"}])
        assert found["hits"]["total"]["value"] == 2
        assert [hit["_source"] for hit in found["hits"]["hits"]] == runs[:2]
        assert es.count(index=index)["count"] == 3
    finally:
        es.indices.delete(index=index, ignore_unavailable=True)


def test_http_bound_to_loopback_only(es_server: EsServer, es: Elasticsearch) -> None:
    node = next(iter(es.nodes.info(node_id="_local", metric="http,transport")["nodes"].values()))
    assert node["http"]["bound_address"] == [f"127.0.0.1:{es_server.port}"]
    transport_port = int(node["transport"]["publish_address"].rsplit(":", 1)[1])
    assert node["transport"]["bound_address"] == [f"127.0.0.1:{transport_port}"]
    listening = es_server.listening()
    assert {port for _, port in listening} >= {es_server.port, transport_port}
    assert {address for address, _ in listening} == {ipaddress.ip_address("127.0.0.1")}, listening
    assert es_server.exports == {"ES_URL": es_server.url}
