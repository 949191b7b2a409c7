"""The agents StatefulSet `<cr>-agents`: one `borgdqn train` (one agent) per pod, usually one GPU each.

A StatefulSet rather than a Deployment for the agents' identities: pod `<cr>-agents-<k>` is agent k, through
container restarts, replacements, rolls, reschedules and scaling down and up, and the controller never runs two
pods of one ordinal at once (a Deployment's pods have random names, so an agent's numbers could only come from a
hash of the name, which two live pods may share). Leased slots in Redis would give the same with a lease to renew
and to fence; the StatefulSet controller already does both. `podManagementPolicy: Parallel`: agents do not wait
for each other to be Ready, so `kubectl scale` starts or stops all the new ordinals at once.
"""

from __future__ import annotations

from typing import Any

from kubernetes.utils.quantity import parse_quantity

from borg_operator import names
from borg_operator.builders.common import (
    Manifest,
    ca_checksum,
    container_security_context,
    empty_dir,
    env,
    env_field,
    env_secret,
    guaranteed,
    memory_ca_volume,
    metadata,
    pod_basics,
)
from borg_operator.builders.config import CONFIG_DIR, CONFIG_KEY, config_checksum
from borg_operator.builders.kafka import KafkaClient
from borg_operator.spec import CONFIG_PATH, GPU_RESOURCE, MEMORY_TLS_DIR, RUN_DIR, CollectiveSpec, SpecError
from borgdqn.memory.redis.acl import AGENT
from borgdqn.memory.redis.client import REDIS_PASSWORD_ENV, REDIS_USERNAME_ENV
from borgdqn.memory.redis.sizing import agent_pod_bytes

# The NVIDIA GPU operator and the cloud GPU node pools taint GPU nodes so that only pods asking for GPUs land
# there; tolerating the key with any value covers `present`, `true` and the rest.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
POD_NAME_ENV = "BORG_POD_NAME"


def replica_need(spec: CollectiveSpec) -> int:
    """Bytes an agent pod needs: its replica of the log (Atari frames of env.screenSize assumed: vector
    observations are smaller) and the agent itself."""
    side = spec.env.screen_size
    return agent_pod_bytes(spec.memory.capacity, (side, side), prioritized=spec.memory.prioritized,
                           recurrent_hidden=spec.agents.network.lstm_hidden if spec.agents.network.lstm else None,
                           gpu=spec.agents.gpus > 0)


def agent_memory(spec: CollectiveSpec) -> str:
    """The agent pods' memory: ``agents.resources.memory``, or sized from the replica when empty; SpecError (one
    line) when the given amount cannot hold the replica."""
    need = replica_need(spec)
    given = spec.agents.resources.memory
    if not given:
        return f"{need >> 30}Gi"
    try:
        amount = parse_quantity(given)
    except ValueError:
        raise SpecError(f"agents.resources.memory {given!r} is not a quantity (e.g. 16Gi)") from None
    if amount < need:
        raise SpecError(
            f"agents.resources.memory {given} cannot hold an agent's replica of the log: memory.capacity "
            f"{spec.memory.capacity} needs {need / 2**30:.0f}Gi per agent pod (leave it empty to size it, or lower "
            "memory.capacity)")
    return given


def _tolerations(spec: CollectiveSpec) -> list[dict[str, Any]]:
    agents = spec.agents
    extra = [dict(toleration) for toleration in agents.tolerations]
    if agents.gpus > 0 and GPU_TOLERATION not in extra:
        return [dict(GPU_TOLERATION), *extra]
    return extra


def _container(cr: str, spec: CollectiveSpec, kafka: KafkaClient) -> dict[str, Any]:
    agents = spec.agents
    gpus = {GPU_RESOURCE: str(agents.gpus)} if agents.gpus > 0 else None
    return {
        "name": "agent",
        "image": agents.image,
        "imagePullPolicy": agents.image_pull_policy,
        "command": ["borgdqn"],
        # Everything else is in the config file. --member: the pod's name ends in its ordinal k, and agent k's id,
        # seeds, replay streams and epsilon-ladder place derive from k (borgdqn.rl.identity); a container
        # restarted in the same pod resumes from its emptyDir run dir.
        # --wait-when-done: a finished agent says so in the memory's Redis and stays up (a StatefulSet would
        # restart a process that exits) until the operator, once every agent is done, scales the agents to 0.
        "args": ["train", "--config", CONFIG_PATH, "--member", f"$({POD_NAME_ENV})", "--wait-when-done"],
        "env": [
            # Identity from the downward API: which pod, where (logs, telemetry, debugging a slow node).
            env_field(POD_NAME_ENV, "metadata.name"),
            env_field("BORG_POD_NAMESPACE", "metadata.namespace"),
            env_field("BORG_NODE_NAME", "spec.nodeName"),
            # The memory's borg-agent user: the log's and the model store's commands on this memory's keys only.
            env(REDIS_USERNAME_ENV, AGENT.name),
            env_secret(REDIS_PASSWORD_ENV, names.redis_secret(cr), AGENT.secret_key),
            # The root filesystem is read-only: caches that go under $HOME (torch, matplotlib) land in /tmp.
            env("HOME", "/tmp"),
            *kafka.env,
        ],
        "resources": guaranteed(agents.resources.cpu, agent_memory(spec), gpus),
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "run", "mountPath": RUN_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            # torch's shared-memory tensors; the runtime's default /dev/shm is 64 MiB.
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "memory-ca", "mountPath": MEMORY_TLS_DIR, "readOnly": True},
            *kafka.mounts,
        ],
    }


def build_agents(cr: str, namespace: str, spec: CollectiveSpec, *, memory_ca: str, config: str,
                 kafka: KafkaClient | None = None, completed: bool = False) -> Manifest:  # fmt: skip
    """``completed``: every agent finished its budget (the status says so): no pod is left, the GPUs go back.
    ``memory_ca``: the memory's CA certificate (PEM) and ``config`` the rendered config (builders/config.py),
    whose checksums the pod template carries; ``kafka``: what reaching Kafka takes (builders/kafka.py:
    kafka_client)."""
    agents = spec.agents
    kafka = kafka or KafkaClient()
    pod_spec: dict[str, Any] = {
        **pod_basics(),
        "containers": [_container(cr, spec, kafka)],
        "volumes": [
            {"name": "config", "configMap": {"name": names.config(cr),
                                             "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
            empty_dir("run"),
            empty_dir("tmp"),
            # Memory-backed, so it counts against the container's memory limit: no separate cap needed.
            empty_dir("dshm", memory=True),
            memory_ca_volume(cr),
            *kafka.volumes,
        ],
    }
    tolerations = _tolerations(spec)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if agents.node_selector:
        pod_spec["nodeSelector"] = dict(agents.node_selector)
    if agents.priority_class_name:
        pod_spec["priorityClassName"] = agents.priority_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(cr, namespace, names.agents(cr), names.AGENT),
        "spec": {
            "replicas": 0 if completed else agents.replicas,
            "selector": {"matchLabels": names.selector_labels(cr, names.AGENT)},
            "podManagementPolicy": "Parallel",
            # One agent at a time (the highest ordinal first) restarts with a new config while the others keep
            # acting and learning from the shared memory; no surge pod, which would need a spare GPU.
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {
                    "labels": names.labels(cr, names.AGENT),
                    # A changed config (a learning rate, a policy) changes the template, so the pods roll.
                    "annotations": {names.CONFIG_CHECKSUM_ANNOTATION: config_checksum(config),
                                    names.MEMORY_CA_ANNOTATION: ca_checksum(memory_ca), **kafka.annotations},
                },
                "spec": pod_spec,
            },
        },
    }
