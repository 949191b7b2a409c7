"""The project's container images: one place for their names and the tag they are released under.

The agent and memory images are the defaults of a collective's `agents.image` / `memory.image` (the CRD carries
them as defaults, see `spec.py`); the operator image is what the borg-operator chart deploys. Each is built from
the repository root (`docs/images.md`). The tag is written out, not read from borgdqn's installed version at
import time: the CRD default is a generated, committed string, and `tests/images/test_dockerfiles.py` holds the tag to
borgdqn's version, so a version bump that forgets the images fails there instead of shipping a stale default.
"""

from __future__ import annotations

REGISTRY = "ghcr.io/borg-dqn"
IMAGE_TAG = "0.1.0"  # == borgdqn's version (pyproject.toml); tests/images/test_dockerfiles.py checks

AGENT_REPOSITORY = f"{REGISTRY}/borgdqn-agent"  # agent_image/Dockerfile: torch (CUDA), ALE, borgdqn[rl]
MEMORY_REPOSITORY = f"{REGISTRY}/borgdqn-memory"  # memory_image/Dockerfile: redis-server + light borgdqn
OPERATOR_REPOSITORY = f"{REGISTRY}/borgdqn-operator"  # operator/Dockerfile: borg-operator + light borgdqn

DEFAULT_AGENT_IMAGE = f"{AGENT_REPOSITORY}:{IMAGE_TAG}"
DEFAULT_MEMORY_IMAGE = f"{MEMORY_REPOSITORY}:{IMAGE_TAG}"
OPERATOR_IMAGE = f"{OPERATOR_REPOSITORY}:{IMAGE_TAG}"
# Managed-mode Kafka is upstream's image, not ours: its tag follows Kafka's releases, not borgdqn's.
KAFKA_REPOSITORY = "apache/kafka"
DEFAULT_KAFKA_IMAGE = f"{KAFKA_REPOSITORY}:4.1.0"

# The repositories a collective may run by default: its pods get the Redis password (agents, the memory, and
# the memory image's indexer and Kibana setup the Elasticsearch user's), so an image is code the credentials
# are handed to. The operator's --allowed-image widens or replaces the list.
DEFAULT_ALLOWED_IMAGES = (AGENT_REPOSITORY, MEMORY_REPOSITORY, KAFKA_REPOSITORY)


def image_allowed(image: str, allowed: tuple[str, ...]) -> bool:
    """``image`` (``REPO``, ``REPO:TAG``, ``REPO@DIGEST`` or both) is from one of the ``allowed`` repositories;
    ``*`` allows every image."""
    repository = image.split("@", 1)[0]
    last = repository.rsplit("/", 1)[-1]
    if ":" in last:  # a tag (a registry's port is before a slash)
        repository = repository[: len(repository) - len(last)] + last.split(":", 1)[0]
    return "*" in allowed or repository in allowed
