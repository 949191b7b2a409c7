"""ECK's Elasticsearch `<cr>-es` and Kibana `<cr>-kibana`, and an Ingress `<cr>-kibana` when asked for.

ECK (Elastic Cloud on Kubernetes) runs them: it creates the pods, TLS certificates (its own CA), the `elastic`
user's Secret and the Services `<es>-es-http` (9200) and `<kibana>-kb-http` (5601), all HTTPS.
"""

from __future__ import annotations

from typing import Any

from borg_operator import names
from borg_operator.builders.common import Manifest, claim_spec, metadata
from borg_operator.spec import CollectiveSpec

ES_API = "elasticsearch.k8s.elastic.co/v1"
KIBANA_API = "kibana.k8s.elastic.co/v1"
ES_PORT = 9200
KIBANA_PORT = 5601
NODE_SET = "default"


def kibana_enabled(spec: CollectiveSpec) -> bool:
    return spec.elastic.mode == "eck" and spec.elastic.kibana.count > 0


def build_elasticsearch(cr: str, namespace: str, spec: CollectiveSpec) -> Manifest:
    elastic = spec.elastic
    return {
        "apiVersion": ES_API,
        "kind": "Elasticsearch",
        "metadata": metadata(cr, namespace, names.elasticsearch(cr), names.ELASTICSEARCH),
        "spec": {
            "version": elastic.version,
            "nodeSets": [{
                "name": NODE_SET,
                "count": elastic.count,
                # Without mmap Elasticsearch does not need vm.max_map_count >= 262144 on the node, which only
                # a privileged init container or the node's admin could set.
                "config": {"node.store.allow_mmap": False},
                # ECK mounts the claim named elasticsearch-data as the data directory.
                "volumeClaimTemplates": [{"metadata": {"name": "elasticsearch-data"},
                                          "spec": claim_spec(elastic.storage)}],
            }],
        },
    }


def build_kibana(cr: str, namespace: str, spec: CollectiveSpec) -> Manifest:
    return {
        "apiVersion": KIBANA_API,
        "kind": "Kibana",
        "metadata": metadata(cr, namespace, names.kibana(cr), names.KIBANA),
        "spec": {
            "version": spec.elastic.version,
            "count": spec.elastic.kibana.count,
            "elasticsearchRef": {"name": names.elasticsearch(cr)},
        },
    }


def build_kibana_ingress(cr: str, namespace: str, spec: CollectiveSpec) -> Manifest:
    ingress = spec.elastic.kibana.ingress
    rule: dict[str, Any] = {"http": {"paths": [{
        "path": "/",
        "pathType": "Prefix",
        "backend": {"service": {"name": names.kibana_http_service(cr), "port": {"number": KIBANA_PORT}}},
    }]}}
    if ingress.host:
        rule = {"host": ingress.host, **rule}
    ingress_spec: dict[str, Any] = {"rules": [rule]}
    if ingress.class_name:
        ingress_spec["ingressClassName"] = ingress.class_name
    if ingress.tls_secret_name:
        tls: dict[str, Any] = {"secretName": ingress.tls_secret_name}
        if ingress.host:
            tls["hosts"] = [ingress.host]
        ingress_spec["tls"] = [tls]
    # ECK's Kibana speaks HTTPS only (its self-signed certificate): ingress-nginx must proxy with HTTPS, or
    # Kibana answers "400: plain HTTP request sent to HTTPS port". Other controllers ignore the annotation.
    annotations = {"nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": metadata(cr, namespace, names.kibana_ingress(cr), names.KIBANA, annotations),
        "spec": ingress_spec,
    }


def build_elastic(cr: str, namespace: str, spec: CollectiveSpec) -> list[Manifest]:
    if spec.elastic.mode != "eck":
        return []
    children = [build_elasticsearch(cr, namespace, spec)]
    if kibana_enabled(spec):
        children.append(build_kibana(cr, namespace, spec))
        if spec.elastic.kibana.ingress.enabled:
            children.append(build_kibana_ingress(cr, namespace, spec))
    return children
