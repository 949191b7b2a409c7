"""Kubernetes events on the collective (what `kubectl describe borg NAME` shows), posted by the operator itself.

kopf's `kopf.event()` only works inside kopf's own per-object tasks; the reconciler also runs from the resync
thread and from the children's watch, so it posts core/v1 Events through its own client, from any thread.
The reconciler posts on transitions only (status.transition_events), so nothing here needs to aggregate.
A failed post is logged and forgotten: an event is never worth failing a reconcile for.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

from borg_operator.apply import REQUEST_TIMEOUT_S, Applier
from borg_operator.status import Event

log = logging.getLogger(__name__)

COMPONENT = "borg-operator"
MAX_MESSAGE = 1024  # what the apiserver keeps of a message


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_body(ref: Mapping[str, Any], event: Event, *, instance: str) -> dict[str, Any]:
    meta = ref["metadata"]
    message = event.message if len(event.message) <= MAX_MESSAGE else event.message[: MAX_MESSAGE - 3] + "..."
    now = _now()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": ref["apiVersion"], "kind": ref["kind"], "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid", "")},
        "type": event.type,
        "reason": event.reason,
        "message": message,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


class EventPoster:
    """Posts Events on objects through the applier's client (`events: create` is all it needs)."""

    def __init__(self, applier: Applier, instance: str | None = None) -> None:
        self.applier = applier
        self.instance = instance or os.environ.get("HOSTNAME", COMPONENT)

    def __call__(self, ref: Mapping[str, Any], event: Event) -> None:
        try:
            resource = self.applier.resource("v1", "Event")
            self.applier.dynamic.create(resource, body=event_body(ref, event, instance=self.instance),
                                        namespace=ref["metadata"]["namespace"], _request_timeout=REQUEST_TIMEOUT_S)
        except Exception as err:  # auxiliary: log, never fail the caller
            log.warning("event %s %s on %s not posted: %s", event.type, event.reason,
                        ref.get("metadata", {}).get("name"), " ".join(str(err).split())[:300])
