"""What the applier counts as a change: only what an apply can change (not a controller's status write)."""

from __future__ import annotations

import copy
from typing import Any

from borg_operator.apply import desired_state


def _statefulset() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "pong-agents", "namespace": "ns", "resourceVersion": "41", "generation": 1,
                     "labels": {"app.kubernetes.io/instance": "pong"}, "annotations": {},
                     "managedFields": [{"manager": "borg-operator", "time": "2026-12-06T10:21:40Z"}]},
        "spec": {"replicas": 2, "template": {"metadata": {"annotations": {"borg.dev/config-checksum": "a"}}}},
        "status": {"replicas": 2, "readyReplicas": 0},
    }


def test_a_status_write_by_the_controller_is_not_a_change() -> None:
    before = _statefulset()
    after = copy.deepcopy(before)
    after["status"]["readyReplicas"] = 2
    after["metadata"]["resourceVersion"] = "57"
    after["metadata"]["managedFields"].append({"manager": "kube-controller-manager", "time": "2026-12-06T10:21:42Z"})
    assert desired_state(after) == desired_state(before)


def test_spec_labels_annotations_and_owners_are_changes() -> None:
    before = _statefulset()
    for change in (lambda o: o["spec"].update(replicas=3),
                   lambda o: o["spec"]["template"]["metadata"]["annotations"].update({"borg.dev/config-checksum": "b"}),
                   lambda o: o["metadata"]["labels"].update(extra="1"),
                   lambda o: o["metadata"]["annotations"].update(note="1"),
                   lambda o: o["metadata"].update(ownerReferences=[{"uid": "u"}])):
        after = copy.deepcopy(before)
        change(after)
        assert desired_state(after) != desired_state(before)
