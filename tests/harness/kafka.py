"""Kafka from Maven Central, run as a single-node KRaft cluster (broker and controller in one JVM).

Maven copies the broker's jars (and a log4j2 backend, which Kafka's own poms leave out) from Maven Central
into the cache, using a Maven repository under the cache so that nothing depends on `~/.m2`. The broker is
started with `java -cp` directly, not through Kafka's shell scripts, so that the harness owns every JVM flag.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import struct
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.cache import Progress, cache_root, installed, require_tool, run_logged, run_maven
from tests.harness.errors import HarnessError
from tests.harness.process import RunningPart, free_port, make_workdir, start_server, wait_until

# The pom's kafka.version is only a default: this one is passed to Maven and wins. (The pom excludes
# kafka-tools-api, whose 4.4.0 jar Maven Central lacks; the broker never loads it.)
VERSION = "4.4.0"
POM = Path(__file__).resolve().parent / "maven" / "kafka" / "pom.xml"
NODE_ID = 1
MIN_JAVA = 17  # Kafka 4 brokers are built for Java 17

# A small heap is plenty for a test broker; SerialGC and C1-only JIT cut start time and memory on 2 cores.
JVM_FLAGS = ("-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true")

LOG4J2_CONFIG = """\
status = warn
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.console.ref = console
# The full config dump and per-request logging drown the lines that explain a failed start.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
"""


@dataclass(frozen=True)
class KafkaInstall:
    root: Path
    java: str

    @property
    def classpath(self) -> str:
        return str(self.root / "libs" / "*")

    def java_cmd(self, main: str, *args: str | Path, log4j_config: Path) -> list[str | Path]:
        return [self.java, *JVM_FLAGS, f"-Dlog4j2.configurationFile={log4j_config}", "-cp", self.classpath, main,
                *args]


def java_major(java: str) -> int:
    # `java -version` prints e.g. `openjdk version "17.0.15"` (or `"1.8.0_392"` for Java 8) on stderr.
    result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr)
    if match is None:
        raise HarnessError(f"kafka: cannot tell the Java version from `{java} -version`:\n{result.stderr.strip()}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def ensure_kafka(progress: Progress) -> KafkaInstall:
    java = require_tool("java", f"run the Kafka broker (Java {MIN_JAVA} or newer)")
    major = java_major(java)
    if major < MIN_JAVA:
        raise HarnessError(f"kafka: {java} is Java {major}; Kafka {VERSION} needs Java {MIN_JAVA} or newer")
    # The pom's digest is in the name too, so that editing it (another log4j, an exclusion) refetches.
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:8]
    target = cache_root() / f"kafka-{VERSION}-{digest}"

    def install(scratch: Path) -> None:
        with progress.step(f"Fetching Kafka {VERSION} from Maven Central", expect="~20 s"):
            run_maven(POM, ["dependency:copy-dependencies", f"-Dkafka.version={VERSION}", "-DincludeScope=runtime",
                            f"-DoutputDirectory={scratch / 'libs'}"],
                      scratch / "install.log", f"fetch Kafka {VERSION}", cwd=scratch)
        if not (scratch / "libs" / f"kafka_2.13-{VERSION}.jar").exists():
            raise HarnessError(f"kafka: Maven finished but kafka_2.13-{VERSION}.jar is not in {scratch / 'libs'}")

    return KafkaInstall(installed(target, install, "kafka"), java)


@dataclass
class KafkaServer(RunningPart):
    install: KafkaInstall | None = None
    port: int = 0
    controller_port: int = 0
    detach: bool = False
    host: str = "127.0.0.1"  # the address clients are told to use (a real node's pods: the node's address)
    secure_port: int = 0  # with `users`: a SASL_SSL (SCRAM-SHA-512) listener besides the plaintext one
    users: dict[str, str] = field(default_factory=dict)  # SCRAM user -> password
    # With `listener`: one more listener, CLIENT, of this protocol and these listener.name.client.* settings
    client_port: int = 0
    listener: tuple[str, dict[str, str]] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def secure_bootstrap(self) -> str:
        return f"{self.host}:{self.secure_port}"

    @property
    def client_bootstrap(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def ca_file(self) -> Path:
        """The CA of the secure listener's certificate (for 127.0.0.1 and localhost)."""
        return self.workdir / "tls" / "ca.crt"

    def launch(self) -> None:
        """Starts the broker from the (formatted) workdir and waits until it serves Metadata; after `halt` or
        `kill` it comes back on the same ports with the topics and records it had."""
        assert self.install is not None
        config, log4j_config = self.workdir / "server.properties", self.workdir / "log4j2.properties"
        proc = start_server("kafka", self.install.java_cmd("kafka.Kafka", config, log4j_config=log4j_config),
                            self.workdir / "kafka.log", cwd=self.workdir, detach=self.detach)
        self.processes = [proc]

        def serves_metadata() -> bool:
            return (NODE_ID, self.host, self.port) in metadata_brokers(self.port)

        wait_until(proc, serves_metadata, "serving Metadata requests", timeout_s=90)

    def halt(self) -> None:
        """A clean shutdown (SIGTERM); the workdir (config, log dirs) stays for `launch`."""
        for proc in self.processes:
            proc.stop(grace_s=30.0)

    def kill(self) -> None:
        """SIGKILL, as a crash; the workdir stays for `launch` (the broker recovers its logs on start)."""
        for proc in self.processes:
            proc.kill()


def _cluster_id() -> str:
    # Kafka's own Uuid.randomUuid: 16 random bytes, URL-safe base64 without padding; never a leading '-',
    # which its command line parsers would take for an option.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _secure_listener(part: KafkaServer) -> dict[str, str]:
    """A SASL_SSL listener named SECURE: SCRAM-SHA-512 logins over TLS with a certificate of a CA of its own."""
    from borg_operator.tls import CERT_FILE, KEY_FILE, make_server_tls

    tls = part.workdir / "tls"
    tls.mkdir(mode=0o700)
    for name, text in make_server_tls("borgdqn harness kafka CA", "kafka", ["localhost", "127.0.0.1"]).items():
        (tls / name).write_text(text)
    # Kafka's PEM keystore: the private key (PKCS#8, unencrypted) and the certificate chain in one file.
    (tls / "keystore.pem").write_text((tls / KEY_FILE).read_text() + (tls / CERT_FILE).read_text())
    prefix = "listener.name.secure."
    return {
        f"{prefix}sasl.enabled.mechanisms": "SCRAM-SHA-512",
        f"{prefix}scram-sha-512.sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        f"{prefix}ssl.keystore.type": "PEM",
        f"{prefix}ssl.keystore.location": str(tls / "keystore.pem"),
    }


def _server_properties(part: KafkaServer) -> str:
    address = "127.0.0.1" if part.host == "127.0.0.1" else "0.0.0.0"
    secure = part.secure_port and part.users
    more = [(name, port, protocol) for name, port, protocol in
            (("SECURE", part.secure_port, "SASL_SSL") if secure else ("", 0, ""),
             ("CLIENT", part.client_port, part.listener[0]) if part.listener else ("", 0, "")) if name]
    lines = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "controller.quorum.voters": f"{NODE_ID}@127.0.0.1:{part.controller_port}",
        # Loopback unless pods must reach it; the controller stays on loopback either way.
        "listeners": ",".join([f"PLAINTEXT://{address}:{part.port}", f"CONTROLLER://127.0.0.1:{part.controller_port}",
                               *(f"{name}://{address}:{port}" for name, port, _ in more)]),
        "advertised.listeners": ",".join([f"PLAINTEXT://{part.host}:{part.port}",
                                          *(f"{name}://{part.host}:{port}" for name, port, _ in more)]),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": ",".join(["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT",
                                                    *(f"{name}:{protocol}" for name, _, protocol in more)]),
        "log.dirs": str(part.workdir / "data"),
        "auto.create.topics.enable": "true",
        "num.partitions": "1",
        # One node can hold one replica; the defaults (3) would leave the internal topics uncreatable.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # One partition each instead of 50: the first consumer group and transaction then start in moments.
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        "num.network.threads": "2",
        "num.io.threads": "2",
        **(_secure_listener(part) if secure else {}),
        **(part.listener[1] if part.listener else {}),
    }
    return "".join(f"{key}={value}\n" for key, value in lines.items())


def _string(data: bytes, at: int) -> tuple[str | None, int]:
    (length,) = struct.unpack_from(">h", data, at)
    at += 2
    if length < 0:
        return None, at
    return data[at:at + length].decode(), at + length


def metadata_brokers(port: int, timeout_s: float = 2.0) -> list[tuple[int, str, int]]:
    """The brokers a Metadata (v4) request to 127.0.0.1:`port` returns, as (node id, host, port).

    Spoken on the socket directly so that the harness needs no Kafka client library. v4: Kafka 4 dropped
    v0-v3 (KIP-896), and v9+ use the flexible (tagged-field) encoding this parser does not speak.
    """
    correlation_id = 7
    client_id = b"borgdqn-harness"
    body = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i?", 0, False)  # no topics, and never create one
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack_from(">i", data)[0]:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("broker closed the connection before answering Metadata")
            data += chunk
    got_correlation_id, _throttle_ms, count = struct.unpack_from(">iii", data, 4)
    if got_correlation_id != correlation_id:
        raise ConnectionError(f"Metadata answer has correlation id {got_correlation_id}")
    at = 16
    brokers = []
    for _ in range(count):
        (node_id,) = struct.unpack_from(">i", data, at)
        host, at = _string(data, at + 4)
        (broker_port,) = struct.unpack_from(">i", data, at)
        _rack, at = _string(data, at + 4)
        brokers.append((node_id, host or "", broker_port))
    return brokers


def start_kafka(install: KafkaInstall, *, detach: bool = False, host: str = "127.0.0.1",
                users: dict[str, str] | None = None,
                listener: tuple[str, dict[str, str]] | None = None) -> KafkaServer:  # fmt: skip
    """A single-node KRaft Kafka on 127.0.0.1 (PLAINTEXT, no auth), topics auto-created, data in a temp dir.

    With another `host` (a real node's address) it listens on every address and tells clients that one. With
    `users` (name -> password) also a SASL_SSL listener (`.secure_bootstrap`, SCRAM-SHA-512 logins of those users,
    a certificate whose CA is `.ca_file`), as a managed Kafka that wants TLS and a login is reached. With
    `listener` (protocol, settings) also a listener CLIENT (`.client_bootstrap`) of that protocol and those
    `listener.name.client.*` settings: what an operator-managed Kafka's StatefulSet renders, run for real.
    """
    workdir = make_workdir("kafka")
    part = KafkaServer(name="kafka", workdir=workdir, install=install, port=free_port(), detach=detach, host=host,
                       users=dict(users or {}), listener=listener)
    try:
        # Two free_port calls can hand out the same port, since nothing holds the first one meanwhile.
        while part.controller_port in (0, part.port):
            part.controller_port = free_port()
        while part.users and part.secure_port in (0, part.port, part.controller_port):
            part.secure_port = free_port()
        while part.listener and part.client_port in (0, part.port, part.controller_port, part.secure_port):
            part.client_port = free_port()
        config = workdir / "server.properties"
        config.write_text(_server_properties(part))
        log4j_config = workdir / "log4j2.properties"
        log4j_config.write_text(LOG4J2_CONFIG)
        # KRaft refuses to start on an unformatted log dir; formatting writes meta.properties and the
        # bootstrap metadata (cluster id, feature levels) there.
        # SCRAM credentials go into the bootstrap metadata: the users exist before the first client comes.
        scram = [arg for name, password in part.users.items()
                 for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")]
        run_logged(install.java_cmd("kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", config, *scram,
                                    log4j_config=log4j_config),
                   workdir / "format.log", "kafka storage format", cwd=workdir)
        part.launch()
        part.exports = {"KAFKA_BOOTSTRAP": part.bootstrap}
        if part.users:
            part.exports.update(KAFKA_SECURE_BOOTSTRAP=part.secure_bootstrap, KAFKA_CA_FILE=str(part.ca_file))
        return part
    except BaseException:
        part.stop()
        raise
