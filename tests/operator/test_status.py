"""The status a collective gets from its children: `borg_operator.status`, a pure function (no cluster)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from borg_operator.spec import parse_spec
from borg_operator.status import (
    CONDITION_TYPES,
    Collective,
    MissingApi,
    Observed,
    compute_status,
    is_completed,
    selector_string,
    status_patch,
    transition_events,
)
from borgdqn.memory.redis.keys import LinkTotals

T0 = datetime.datetime(2025, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)
SELECTOR = "app.kubernetes.io/component=agent,app.kubernetes.io/instance=pong,app.kubernetes.io/name=borg-dqn"


def body(spec: dict[str, Any] | None = None, *, generation: int = 1, status: dict[str, Any] | None = None,
         paused: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "pong", "namespace": "rl", "generation": generation}
    if paused is not None:
        meta["annotations"] = {"borg.dev/paused": paused}
    return {"apiVersion": "borg.dev/v1alpha1", "kind": "BorgCollective", "metadata": meta,
            "spec": spec if spec is not None else {}, "status": status or {}}


def workload(replicas: int, ready: int, *, updated: int | None = None, generation: int = 1,
             observed: int | None = None, kind: str = "Deployment") -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "readyReplicas": ready,
                   "updatedReplicas": replicas if updated is None else updated,
                   "observedGeneration": generation if observed is None else observed},
    }


def eck(health: str) -> dict[str, Any]:
    return {"status": {"health": health, "phase": "Ready"}}


def healthy(**overrides: Any) -> Observed:
    parts: dict[str, Any] = {
        "agents": workload(2, 2),
        "memory": workload(1, 1, kind="StatefulSet"),
        "kafka": workload(1, 1, kind="StatefulSet"),
        "elasticsearch": eck("green"),
        "kibana": eck("green"),
        "indexer": workload(1, 1),
        "observed_generation": 1,
        "selector": SELECTOR,
    }
    parts.update(overrides)
    return Observed(**parts)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["type"]: c for c in status["conditions"]}


def test_what_the_agents_lost_on_the_way_to_the_log_is_in_the_status_and_the_memory_condition() -> None:
    links = LinkTotals(links=2, dropped_chunks=7, write_errors=2, skipped_chunks=3, outage_s=12.34)
    status = compute_status(Collective.from_body(body()), healthy(memory_fill=0.5, memory_links=links), T0)
    assert status["memory"] == {"fill": "50%", "droppedChunks": 7, "writeErrors": 2, "skippedChunks": 3,
                                "outageSeconds": 12.3}
    assert conditions(status)["MemoryReady"]["message"].endswith(
        "50% full; agents dropped 7 chunks, Redis refused 2 appends, tails skipped 3")
    refused = LinkTotals(links=2, write_errors=1)
    status = compute_status(Collective.from_body(body()), healthy(memory_fill=0.5, memory_links=refused), T0)
    assert "Redis refused 1 appends" in conditions(status)["MemoryReady"]["message"]
    quiet = compute_status(Collective.from_body(body()), healthy(memory_fill=0.5, memory_links=LinkTotals()), T0)
    assert quiet["memory"] == {"fill": "50%", "droppedChunks": 0, "writeErrors": 0, "skippedChunks": 0,
                               "outageSeconds": 0.0}
    assert conditions(quiet)["MemoryReady"]["message"].endswith("50% full")


def test_a_memory_that_refuses_the_operators_user_makes_memory_ready_false() -> None:
    refused = "AuthenticationError: invalid username-password pair or user is disabled."
    status = compute_status(Collective.from_body(body()), healthy(memory_refused=refused), T0)
    memory = conditions(status)["MemoryReady"]
    assert (memory["status"], memory["reason"]) == ("False", "AccessRefused")
    assert memory["message"].endswith(f"the memory refuses the operator's monitor user: {refused}")
    assert conditions(status)["Ready"]["status"] == "False"


def test_all_children_ready_make_a_running_collective_with_every_declared_field() -> None:
    status = compute_status(Collective.from_body(body()), healthy(memory_fill=0.374), T0)

    assert status["phase"] == "Running"
    assert status["observedGeneration"] == 1
    assert [c["type"] for c in status["conditions"]] == list(CONDITION_TYPES)
    assert all(c["status"] == "True" for c in status["conditions"] if c["type"] != "Complete")
    # The agents' finished marks were not read (no memory_finished): whether they are done is not known yet.
    assert (conditions(status)["Complete"]["status"], conditions(status)["Complete"]["reason"]) == ("Unknown",
                                                                                                     "NotKnown")
    assert "completed" not in status
    assert all(set(c) == {"type", "status", "reason", "message", "lastTransitionTime"} for c in status["conditions"])
    assert conditions(status)["Ready"]["lastTransitionTime"] == "2025-03-01T12:00:00Z"
    assert conditions(status)["AgentsReady"]["message"] == "2/2 agents ready"
    assert status["agents"] == {"replicas": 2, "ready": 2, "selector": SELECTOR}
    assert status["gpus"] == 2  # 2 agents x 1 GPU (the defaults)
    assert status["memory"] == {"fill": "37%"}
    assert "37% full" in conditions(status)["MemoryReady"]["message"]


def test_nothing_created_yet_is_pending_and_unknown_fill_is_left_out() -> None:
    status = compute_status(Collective.from_body(body()), Observed(), T0)

    assert status["phase"] == "Pending"
    assert "observedGeneration" not in status  # nothing was reconciled yet
    assert "memory" not in status
    found = conditions(status)
    assert found["AgentsReady"]["reason"] == "NotCreated"
    assert found["Ready"]["status"] == "False"
    assert found["Ready"]["reason"] == "AgentsNotReady"
    assert status["agents"] == {"replicas": 0, "ready": 0, "selector": ""}


def test_last_transition_time_moves_only_when_the_status_of_a_condition_does() -> None:
    first = compute_status(Collective.from_body(body()), healthy(agents=workload(2, 1)), T0)
    assert first["phase"] == "Creating"
    assert conditions(first)["AgentsReady"]["message"] == "1/2 agents ready"

    # Later, still 1 of 2 but now 3 desired: the message changes, the status (False) does not.
    later = compute_status(Collective.from_body(body({"agents": {"replicas": 3}}, status=first)),
                           healthy(agents=workload(3, 1)), T1)
    assert conditions(later)["AgentsReady"]["message"] == "1/3 agents ready"
    assert conditions(later)["AgentsReady"]["lastTransitionTime"] == "2025-03-01T12:00:00Z"
    assert conditions(later)["MemoryReady"]["lastTransitionTime"] == "2025-03-01T12:00:00Z"

    ready = compute_status(Collective.from_body(body({"agents": {"replicas": 3}}, status=later)),
                           healthy(agents=workload(3, 3)), T1)
    assert conditions(ready)["AgentsReady"]["lastTransitionTime"] == "2025-03-01T12:05:00Z"
    assert conditions(ready)["Ready"]["lastTransitionTime"] == "2025-03-01T12:05:00Z"
    assert conditions(ready)["MemoryReady"]["lastTransitionTime"] == "2025-03-01T12:00:00Z"
    assert ready["phase"] == "Running"

    # A Running collective that loses an agent is Degraded, not Creating.
    degraded = compute_status(Collective.from_body(body({"agents": {"replicas": 3}}, status=ready)),
                              healthy(agents=workload(3, 2)), T1)
    assert degraded["phase"] == "Degraded"


def test_a_rollout_the_deployment_controller_has_not_seen_is_not_ready() -> None:
    # Generation 2 of the Deployment (new checksum) not yet observed: the ready pods are the old ones.
    rolling = workload(2, 2, generation=2, observed=1)
    status = compute_status(Collective.from_body(body()), healthy(agents=rolling), T0)
    assert conditions(status)["AgentsReady"]["reason"] == "Progressing"
    # New pods not all updated yet.
    status = compute_status(Collective.from_body(body()), healthy(agents=workload(2, 2, updated=1)), T0)
    assert conditions(status)["AgentsReady"]["status"] == "False"


def test_more_agents_than_gpus_says_so_in_agents_ready() -> None:
    message = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. preemption: 0/2 nodes are available."
    status = compute_status(Collective.from_body(body({"agents": {"replicas": 5}})),
                            healthy(agents=workload(5, 4), unschedulable=[message]), T0)
    agents = conditions(status)["AgentsReady"]
    assert agents["status"] == "False"
    assert agents["reason"] == "Unschedulable"
    assert agents["message"].startswith("4/5 agents ready; 1 agent pod cannot be scheduled: more agents than free "
                                        "GPUs (1 nvidia.com/gpu each): 0/2 nodes are available")
    assert conditions(status)["Ready"]["reason"] == "AgentsNotReady"
    assert status["gpus"] == 5


def test_scaled_to_zero_is_ready() -> None:
    status = compute_status(Collective.from_body(body({"agents": {"replicas": 0}})),
                            healthy(agents=workload(0, 0)), T0)
    assert conditions(status)["AgentsReady"]["reason"] == "ScaledToZero"
    assert status["phase"] == "Running"
    assert status["gpus"] == 0


def test_invalid_spec_fails_ready_and_keeps_what_the_children_said() -> None:
    running = compute_status(Collective.from_body(body()), healthy(), T0)
    bad = Collective.from_body(body({"kafka": {"mode": "external"}}, generation=2, status=running))
    assert bad.spec is None and bad.spec_error is not None
    assert bad.spec_error.startswith("spec.kafka") and "bootstrapServers" in bad.spec_error

    status = compute_status(bad, Observed(observed_generation=2), T1)
    found = conditions(status)
    assert status["phase"] == "Failed"
    assert status["observedGeneration"] == 2
    assert found["Ready"] == {"type": "Ready", "status": "False", "reason": "InvalidSpec",
                              "message": bad.spec_error, "lastTransitionTime": "2025-03-01T12:05:00Z"}
    assert found["AgentsReady"]["status"] == "True"  # the agents still run as they were
    assert found["AgentsReady"]["lastTransitionTime"] == "2025-03-01T12:00:00Z"
    assert status["gpus"] == 2  # the last known figure

    fresh = compute_status(Collective.from_body(body({"agents": {"replicas": -1}})), Observed(), T0)
    assert {c["status"] for c in fresh["conditions"]} == {"False", "Unknown"}
    assert conditions(fresh)["KafkaReady"]["reason"] == "InvalidSpec"
    assert "gpus" not in fresh


@pytest.mark.parametrize(("spec", "api", "reason", "names", "part"), [
    ({"kafka": {"mode": "strimzi"}}, MissingApi("kafka.strimzi.io/v1beta2", "Kafka"), "StrimziNotInstalled",
     "Strimzi", "KafkaReady"),
    ({}, MissingApi("elasticsearch.k8s.elastic.co/v1", "Elasticsearch"), "EckNotInstalled", "ECK",
     "ElasticReady"),
])
def test_missing_operators_say_what_to_install(spec: dict[str, Any], api: MissingApi, reason: str, names: str,
                                               part: str) -> None:
    status = compute_status(Collective.from_body(body(spec)), Observed(missing=[api], observed_generation=1), T0)
    found = conditions(status)
    assert status["phase"] == "Failed"
    assert found["Ready"]["status"] == "False"
    assert found["Ready"]["reason"] == reason
    assert f"install {names}" in found["Ready"]["message"]
    assert api.kind in found["Ready"]["message"]
    assert found[part]["reason"] == reason


def test_kafka_modes() -> None:
    external = compute_status(
        Collective.from_body(body({"kafka": {"mode": "external", "bootstrapServers": "kafka.example:9092"}})),
        healthy(kafka=None), T0)
    assert conditions(external)["KafkaReady"]["status"] == "True"
    assert "kafka.example:9092" in conditions(external)["KafkaReady"]["message"]

    strimzi = Collective.from_body(body({"kafka": {"mode": "strimzi"}}))
    not_yet = {"status": {"conditions": [{"type": "NotReady", "status": "True", "message": "Pods starting"}]}}
    assert conditions(compute_status(strimzi, healthy(kafka=not_yet), T0))["KafkaReady"]["reason"] == \
        "StrimziNotReady"
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert conditions(compute_status(strimzi, healthy(kafka=ready), T0))["KafkaReady"]["status"] == "True"

    brokers = compute_status(Collective.from_body(body()), healthy(kafka=workload(3, 1, kind="StatefulSet")), T0)
    assert conditions(brokers)["KafkaReady"]["message"] == "1/3 brokers ready"


def test_elastic_health() -> None:
    collective = Collective.from_body(body())
    yellow = compute_status(collective, healthy(elasticsearch=eck("yellow")), T0)
    assert conditions(yellow)["ElasticReady"]["status"] == "True"
    red = compute_status(collective, healthy(elasticsearch=eck("red")), T0)
    assert conditions(red)["ElasticReady"]["reason"] == "ElasticsearchNotReady"
    assert conditions(red)["ElasticReady"]["message"] == "Elasticsearch red, Kibana green, indexer 1/1 ready"
    no_kibana = compute_status(collective, healthy(kibana=None), T0)
    assert conditions(no_kibana)["ElasticReady"]["reason"] == "KibanaNotReady"
    without_kibana = compute_status(Collective.from_body(body({"elastic": {"kibana": {"count": 0}}})),
                                    healthy(kibana=None), T0)
    assert conditions(without_kibana)["ElasticReady"]["status"] == "True"
    disabled = compute_status(Collective.from_body(body({"elastic": {"mode": "disabled"}})),
                              healthy(elasticsearch=None, kibana=None, indexer=None), T0)
    assert conditions(disabled)["ElasticReady"]["reason"] == "Disabled"


def test_paused_and_reconcile_errors() -> None:
    paused = compute_status(Collective.from_body(body(paused="true")), healthy(), T0)
    assert paused["phase"] == "Paused"
    assert conditions(paused)["Ready"]["reason"] == "Paused"
    assert conditions(paused)["Ready"]["status"] == "True"  # the children still run
    assert compute_status(Collective.from_body(body(paused="false")), healthy(), T0)["phase"] == "Running"

    failed = compute_status(Collective.from_body(body()), healthy(error="ApiException 500: etcd timeout"), T0)
    assert conditions(failed)["Ready"]["reason"] == "ReconcileError"
    assert conditions(failed)["Ready"]["message"] == "ApiException 500: etcd timeout"


def test_status_is_written_only_when_it_changes() -> None:
    first = compute_status(Collective.from_body(body()), healthy(memory_fill=0.5), T0)
    assert status_patch({}, first) == first
    again = compute_status(Collective.from_body(body(status=first)), healthy(memory_fill=0.5), T1)
    assert again == first
    assert status_patch(first, again) is None

    # Fill no longer known: the key goes (null in a merge patch); someone else's key stays.
    unknown = compute_status(Collective.from_body(body(status=first)), healthy(), T1)
    patch = status_patch({**first, "other": 1}, unknown)
    assert patch is not None and set(patch) == {"memory", "conditions"} and patch["memory"] is None
    assert conditions(patch)["MemoryReady"]["message"] == "1/1 memory pods ready"


def test_selector_string_is_label_selector_syntax() -> None:
    assert selector_string({"b": "2", "a": "1"}) == "a=1,b=2"


def test_events_are_posted_on_transitions_only() -> None:
    from borg_operator.status import Event, transition_events

    creating = compute_status(Collective.from_body(body()), healthy(agents=workload(2, 1)), T0)
    assert transition_events({}, creating) == []
    ready = compute_status(Collective.from_body(body(status=creating)), healthy(), T1)
    assert transition_events(creating, ready) == [
        Event("Normal", "Ready", "agents, memory, Kafka and Elasticsearch are ready")]
    assert transition_events(ready, ready) == []

    message = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    short = compute_status(Collective.from_body(body({"agents": {"replicas": 5}}, status=ready)),
                           healthy(agents=workload(5, 4), unschedulable=[message]), T1)
    events = transition_events(ready, short)
    assert [(e.type, e.reason) for e in events] == [("Warning", "Unschedulable")]
    assert "more agents than free GPUs" in events[0].message
    assert transition_events(short, short) == []

    missing = compute_status(Collective.from_body(body({"kafka": {"mode": "strimzi"}}, status=ready)),
                             healthy(missing=[MissingApi("kafka.strimzi.io/v1beta2", "Kafka")]), T1)
    assert [(e.type, e.reason) for e in transition_events(ready, missing)] == [("Warning", "StrimziNotInstalled")]
    # The timer finds the same problem again: nothing new is posted.
    assert transition_events(missing, missing) == []

    paused = compute_status(Collective.from_body(body(status=ready, paused="true")), healthy(), T1)
    assert [(e.type, e.reason) for e in transition_events(ready, paused)] == [("Normal", "Paused")]
    resumed = compute_status(Collective.from_body(body(status=paused)), healthy(), T1)
    assert [(e.type, e.reason) for e in transition_events(paused, resumed)] == [("Normal", "Resumed")]


# --- completion ---------------------------------------------------------------------------------------------
def test_every_agent_past_its_budget_makes_the_collective_succeeded_with_its_gpus_released() -> None:
    spec = {"agents": {"replicas": 2, "steps": 5000}}
    running = compute_status(Collective.from_body(body(spec)), healthy(memory_fill=1.0, memory_finished={0: 5000}), T0)
    assert running["phase"] == "Running" and "completed" not in running and running["gpus"] == 2
    assert conditions(running)["Complete"] == {"type": "Complete", "status": "False", "reason": "Training",
                                               "message": "1/2 agents finished their 5,000 env steps",
                                               "lastTransitionTime": "2025-03-01T12:00:00Z"}
    # Agent 1 done too (agent 7, left from a larger hive, does not count): Succeeded, the pods are released.
    collective = Collective.from_body(body(spec, status=running))
    done = compute_status(collective, healthy(agents=workload(0, 0, kind="StatefulSet"), memory_fill=1.0,
                                              memory_finished={0: 5000, 1: 5008, 7: 3}), T1)
    assert done["phase"] == "Succeeded"
    assert done["completed"] == {"steps": 5000, "agents": 2} and done["gpus"] == 0
    assert conditions(done)["Complete"]["status"] == "True"
    assert conditions(done)["Complete"]["message"] == "all 2 agents finished their 5,000 env steps"
    assert conditions(done)["AgentsReady"]["reason"] == "Completed"  # no pods, as wanted
    assert is_completed(done, parse_spec(spec))
    events = transition_events(running, done)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Succeeded")]
    assert "the memory, Kafka and Elasticsearch stay" in events[0].message


def test_a_succeeded_collective_stays_so_while_its_memory_is_unread_and_resumes_when_the_budget_grows() -> None:
    spec = {"agents": {"replicas": 2, "steps": 5000}}
    done = compute_status(Collective.from_body(body(spec)), healthy(memory_fill=1.0, memory_finished={0: 5000,
                                                                                                     1: 5000}), T0)
    unread = compute_status(Collective.from_body(body(spec, status=done)), healthy(), T1)
    assert unread["phase"] == "Succeeded" and unread["completed"] == done["completed"]
    # A larger budget, or another agent, is not what the agents finished: they get their pods back.
    for more, phase in (({"agents": {"replicas": 2, "steps": 9000}}, "Running"),  # the 2 pods are up and ready
                        ({"agents": {"replicas": 3, "steps": 5000}}, "Creating")):  # the third pod is not yet
        assert not is_completed(done, parse_spec(more))
        again = compute_status(Collective.from_body(body(more, status=done)), healthy(), T1)
        assert again["phase"] != "Succeeded" and "completed" not in again
        with_marks = compute_status(Collective.from_body(body(more, status=done)),
                                    healthy(memory_fill=1.0, memory_finished={0: 5000, 1: 5000}), T1)
        assert with_marks["phase"] == phase
        assert conditions(with_marks)["Complete"]["reason"] == "Training"
