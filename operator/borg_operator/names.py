"""Names and labels of a collective's children: one place, so builders, reconciler and status agree.

Every child is named `<cr>-<part>` and labelled with the `app.kubernetes.io/*` recommended labels; selectors
use the stable subset (name, instance, component), never `managed-by`/`part-of`, which could change without the
pods changing.
"""

from __future__ import annotations

from borg_operator.spec import SpecError

APP = "borg-dqn"
MANAGED_BY = "borg-operator"
PART_OF = "borg-dqn"
OPERATOR_APP = "borg-operator"  # app.kubernetes.io/name of the operator's own pods (the chart sets it)

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"

# Components (the value of app.kubernetes.io/component).
AGENT = "agent"
MEMORY = "memory"
CONFIG = "config"
KAFKA = "kafka"
ELASTICSEARCH = "elasticsearch"
KIBANA = "kibana"
INDEXER = "indexer"
KIBANA_SETUP = "kibana-setup"

# Annotations the builders write.
CONFIG_CHECKSUM_ANNOTATION = "borg.dev/config-checksum"
# The sha256 of the memory's CA certificate on the memory's and the agents' pod templates: a new certificate (the
# TLS Secret deleted and made anew) rolls both, so that no pod keeps trusting or serving the old one.
MEMORY_CA_ANNOTATION = "borg.dev/memory-ca-checksum"
KAFKA_CA_ANNOTATION = "borg.dev/kafka-ca-checksum"

# Name limits. A StatefulSet's pods carry `controller-revision-hash: <sts>-<10 chars>`, a label value (<= 63),
# so a StatefulSet name may have at most 52 characters: `<cr>-memory` leaves 45. ECK refuses Elasticsearch and
# Kibana names longer than 36 (its MaxResourceNameLength), and ours are `<cr>-es` and `<cr>-kibana`. Strimzi
# names a node `<kafka>-<pool>-<node id>`, i.e. `<cr>-kafka-<cr>-<id>`, and uses it as a label value too.
MAX_NAME = 45
MAX_NAME_ECK = 36 - len("-kibana")
MAX_NAME_STRIMZI = (63 - len("-kafka-") - len("-") - 3) // 2  # node ids of up to 3 digits


def agents(cr: str) -> str:
    return f"{cr}-agents"


def memory(cr: str) -> str:
    return f"{cr}-memory"


def memory_headless(cr: str) -> str:
    return f"{cr}-memory-headless"


def config(cr: str) -> str:
    return f"{cr}-config"


def redis_secret(cr: str) -> str:
    return f"{cr}-redis"


def memory_tls_secret(cr: str) -> str:
    return f"{cr}-memory-tls"


def kafka(cr: str) -> str:
    return f"{cr}-kafka"


def kafka_tls_secret(cr: str) -> str:
    return f"{cr}-kafka-tls"


def kafka_user(cr: str) -> str:
    """Strimzi mode: the KafkaUser the collective's clients log in as (and the Secret Strimzi writes for it)."""
    return f"{cr}-telemetry"


def strimzi_cluster_ca_cert(cr: str) -> str:
    """Strimzi's Secret of its cluster CA's certificate, for the Kafka `<cr>-kafka`."""
    return f"{kafka(cr)}-cluster-ca-cert"


def kafka_headless(cr: str) -> str:
    return f"{cr}-kafka-headless"


def kafka_node_pool(cr: str) -> str:
    # Unique in the namespace, yet short: Strimzi's node (pod) names repeat it after the Kafka's name.
    return cr


def elasticsearch(cr: str) -> str:
    return f"{cr}-es"


def kibana(cr: str) -> str:
    return f"{cr}-kibana"


def kibana_ingress(cr: str) -> str:
    # Its own kind, so it may share the Kibana resource's name.
    return f"{cr}-kibana"


def indexer(cr: str) -> str:
    return f"{cr}-indexer"


def kibana_setup(cr: str) -> str:
    return f"{cr}-kibana-setup"


# What ECK creates for an Elasticsearch named E and a Kibana named K (its naming, not ours).
def es_http_service(cr: str) -> str:
    return f"{elasticsearch(cr)}-es-http"


def es_elastic_user_secret(cr: str) -> str:
    return f"{elasticsearch(cr)}-es-elastic-user"


def es_http_ca_secret(cr: str) -> str:
    return f"{elasticsearch(cr)}-es-http-certs-public"


def kibana_http_service(cr: str) -> str:
    return f"{kibana(cr)}-kb-http"


def kibana_http_ca_secret(cr: str) -> str:
    return f"{kibana(cr)}-kb-http-certs-public"


def selector_labels(cr: str, component: str) -> dict[str, str]:
    """The labels a controller selects its pods by (immutable in a Deployment/StatefulSet selector)."""
    return {LABEL_NAME: APP, LABEL_INSTANCE: cr, LABEL_COMPONENT: component}


def labels(cr: str, component: str) -> dict[str, str]:
    """Every label a child (and its pods) carries."""
    return {**selector_labels(cr, component), LABEL_MANAGED_BY: MANAGED_BY, LABEL_PART_OF: PART_OF}


def instance_selector(cr: str) -> dict[str, str]:
    """All children of one collective (for listing them, e.g. to prune what a spec no longer renders)."""
    return {LABEL_INSTANCE: cr, LABEL_MANAGED_BY: MANAGED_BY}


def selector_string(cr: str) -> str:
    """The agents' label selector as a string: `status.agents.selector`, read by the scale subresource (HPA)."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(cr, AGENT).items()))


def max_name_length(*, eck: bool, strimzi: bool) -> int:
    """The longest collective name whose children all keep within Kubernetes', ECK's and Strimzi's limits."""
    return min([MAX_NAME, *([MAX_NAME_ECK] if eck else []), *([MAX_NAME_STRIMZI] if strimzi else [])])


def check_name(cr: str, *, eck: bool, strimzi: bool) -> None:
    """SpecError when a child's name would break a limit (one line for the status)."""
    limit = max_name_length(eck=eck, strimzi=strimzi)
    if len(cr) <= limit:
        return
    if limit == MAX_NAME_STRIMZI and strimzi:
        why = f"Strimzi names its nodes {kafka(cr)}-{kafka_node_pool(cr)}-ID, at most 63 characters"
    elif limit == MAX_NAME_ECK and eck:
        why = f"ECK refuses an Elasticsearch or Kibana name ({kibana(cr)}) longer than 36 characters"
    else:
        why = f"the StatefulSet {memory(cr)} must leave room for its pods' revision label (63 characters)"
    raise SpecError(f"metadata.name: {len(cr)} characters is too long, at most {limit}: {why}")
