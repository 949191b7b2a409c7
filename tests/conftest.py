"""Shared fixtures. Agent processes use one torch thread each so that tests behave alike on 2 cores.

The server fixtures start REAL servers from `tests/harness/` once per session and stop them (process group,
temp dir) when the session ends, also when a test failed or the run was interrupted. A server that cannot
start fails every test that needs it with the reason; nothing is skipped.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TypeVar

import pytest

from tests.harness.cache import Progress
from tests.harness.errors import HarnessError
from tests.harness.process import RunningPart
from tests.harness.redis import RedisServer, ensure_redis, start_redis

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A CI timeout or `kill` sends SIGTERM; as a KeyboardInterrupt it lets pytest run the finalizers that stop
    # the servers and remove their temp dirs (PDEATHSIG alone would kill the servers but leave the dirs).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


# Markers that every test of a folder carries (a module may add its own): the folders mirror the package, and
# where all of a folder's tests talk to real servers, the folder says so once.
FOLDER_MARKERS = {"e2e": ("integration",)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        path = Path(str(item.path))
        if not path.is_relative_to(here):
            continue
        folder = path.relative_to(here).parts[0]
        for marker in FOLDER_MARKERS.get(folder, ()):
            item.add_marker(marker)


P = TypeVar("P", bound=RunningPart)


def _terminal(request: pytest.FixtureRequest) -> AbstractContextManager[object]:
    """Lets install progress reach the terminal while pytest captures output."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    return capture.global_and_fixture_disabled() if capture is not None else nullcontext()


def start_part(request: pytest.FixtureRequest, start: Callable[[Progress], P]) -> Iterator[P]:
    """Starts a part (installing it first if needed) and stops it when the fixture's scope ends."""
    with _terminal(request):
        try:
            part = start(Progress())
        except HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)
    try:
        yield part
    finally:
        part.stop()


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A password-protected redis-server on 127.0.0.1, shared by the session (no persistence)."""
    yield from start_part(request, lambda progress: start_redis(ensure_redis(progress)))


@pytest.fixture
def redis_server_aof(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A redis-server of the test's own with AOF on, for tests that restart it and count what survived."""
    yield from start_part(
        request, lambda progress: start_redis(ensure_redis(progress), aof=True, appendfsync="always"))


# The parts below import lazily: a session that needs none of them never touches Java or Go.


@pytest.fixture(scope="session")
def kafka_server(request: pytest.FixtureRequest) -> Iterator[RunningPart]:
    """A single-node KRaft Kafka (broker + controller) on 127.0.0.1; `.bootstrap` is HOST:PORT."""
    from tests.harness.kafka import ensure_kafka, start_kafka

    yield from start_part(request, lambda progress: start_kafka(ensure_kafka(progress)))


@pytest.fixture(scope="module")
def kafka_server_secure(request: pytest.FixtureRequest) -> Iterator[RunningPart]:
    """A Kafka that also listens with SASL_SSL: `.secure_bootstrap`, `.ca_file` (its certificate's CA), `.users`
    (SCRAM-SHA-512 name -> password: `borg-agent`, `borg-indexer`). About 5 s to start."""
    import secrets

    from tests.harness.kafka import ensure_kafka, start_kafka

    users = {name: secrets.token_urlsafe(18) for name in ("borg-agent", "borg-indexer")}
    yield from start_part(request, lambda progress: start_kafka(ensure_kafka(progress), users=users))


@pytest.fixture
def kafka_server_own(request: pytest.FixtureRequest) -> Iterator[RunningPart]:
    """A Kafka of the test's own, for tests that stop it (`.halt()`/`.kill()`) and `.launch()` it again on the
    same port with its topics and records. About 5 s to start: use it only where the outage is the point."""
    from tests.harness.kafka import ensure_kafka, start_kafka

    yield from start_part(request, lambda progress: start_kafka(ensure_kafka(progress)))


@pytest.fixture(scope="session")
def es_server(request: pytest.FixtureRequest) -> Iterator[RunningPart]:
    """A single-node Elasticsearch (security off, small heap) on 127.0.0.1; `.url` is its HTTP address."""
    from tests.harness.elasticsearch import ensure_elasticsearch, start_elasticsearch

    yield from start_part(request, lambda progress: start_elasticsearch(ensure_elasticsearch(progress)))


@pytest.fixture
def es_server_own(request: pytest.FixtureRequest) -> Iterator[RunningPart]:
    """An Elasticsearch of the test's own, for tests that stop it (`.halt()`/`.kill()`) and `.launch()` it again
    on the same port with its data. About 10 s to start: use it only where the outage is the point."""
    from tests.harness.elasticsearch import ensure_elasticsearch, start_elasticsearch

    yield from start_part(request, lambda progress: start_elasticsearch(ensure_elasticsearch(progress)))


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[RunningPart]:
    """etcd + kube-apiserver (RBAC on, client-certificate admin); `.kubeconfig` works for kubectl, helm, kopf."""
    from tests.harness.kube import ensure_kube, start_kube

    yield from start_part(request, lambda progress: start_kube(ensure_kube(progress)))


@pytest.fixture(scope="session")
def kube_full(request: pytest.FixtureRequest, kube: RunningPart) -> RunningPart:
    """`kube` plus kube-controller-manager, kube-scheduler and kwok with fake nvidia.com/gpu nodes.

    The same cluster as `kube` (one apiserver per session); the extra processes stop with it.
    """
    from tests.harness.kube import KubeCluster, ensure_kube

    assert isinstance(kube, KubeCluster)
    with _terminal(request):
        try:
            kube.add_full_tier(ensure_kube(Progress(), full=True))
        except HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)
    return kube
