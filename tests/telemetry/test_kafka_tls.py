"""Kafka on the wire, as the operator renders it: a managed Kafka's CA and certificates (borg_operator.tls), the
spec's TLS settings and what each mode renders for the brokers and for every pod that talks to Kafka.

A real broker runs the rendered listener in tests/e2e/test_collective_data_path.py (the collective's agents, monitor
and indexer reach it with the rendered certificate, and a client without one is refused) and a SASL_SSL one in
tests/telemetry/test_kafka_access.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from borg_operator.builders import Material
from borg_operator.spec import SpecError, parse_spec
from borg_operator.tls import (
    CA_FILE,
    CERT_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    KAFKA_CLIENT,
    KAFKA_TLS_KEYS,
    KEY_FILE,
    KEYSTORE_FILE,
    make_kafka_tls,
)
from borgdqn.config import ConfigError, build_config
from tests.support.operator_process import image_properties, render_collective

NAMESPACE = "borg"
PASSWORDS = {key: "unused" for key in ("agent-password", "monitor-password", "admin-password")}
MEMORY_TLS = {key: "unused" for key in (CA_FILE, CERT_FILE, KEY_FILE)}


def render(spec: dict[str, Any], kafka_tls: dict[str, str] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    children = render_collective("hive", NAMESPACE, spec, Material(PASSWORDS, MEMORY_TLS, kafka_tls or {}))
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def pod(children: dict[tuple[str, str], dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return dict(children[(kind, name)]["spec"]["template"]["spec"])


def container(children: dict[tuple[str, str], dict[str, Any]], kind: str, name: str, which: str) -> dict[str, Any]:
    return next(c for c in pod(children, kind, name)["containers"] if c["name"] == which)


def telemetry(children: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return dict(yaml.safe_load(children[("ConfigMap", "hive-config")]["data"]["borgdqn.yaml"])["telemetry"])


CLIENTS = (("StatefulSet", "hive-agents", "agent"), ("StatefulSet", "hive-memory", "monitor"),
           ("Deployment", "hive-indexer", "indexer"))


# ------------------------------------------------------------------------------------------ the certificates
def test_the_brokers_and_the_clients_certificates_share_one_ca_whose_key_is_gone() -> None:
    material = make_kafka_tls("hive", NAMESPACE)
    assert set(material) == set(KAFKA_TLS_KEYS)
    ca = x509.load_pem_x509_certificate(material[CA_FILE].encode())
    broker = x509.load_pem_x509_certificate(material[CERT_FILE].encode())
    client = x509.load_pem_x509_certificate(material[CLIENT_CERT_FILE].encode())
    for cert in (broker, client):
        cert.verify_directly_issued_by(ca)
    # The brokers serve and, between themselves, are clients; the telemetry clients are clients only.
    usages = {name: list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
              for name, c in (("broker", broker), ("client", client))}
    assert usages == {"broker": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                      "client": [ExtendedKeyUsageOID.CLIENT_AUTH]}
    assert client.subject.rfc4514_string() == f"CN={KAFKA_CLIENT}"
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    # The client Service and every broker through the headless Service (their advertised listeners).
    assert {"hive-kafka.borg.svc", "*.hive-kafka-headless.borg.svc"} <= set(names)
    assert "localhost" not in names and "127.0.0.1" not in str(names)
    # Kafka's PEM keystore: the brokers' key, then their certificate; each key matches its certificate.
    assert material[KEYSTORE_FILE] == material[KEY_FILE] + material[CERT_FILE]
    for key, cert in ((KEY_FILE, broker), (CLIENT_KEY_FILE, client)):
        private = serialization.load_pem_private_key(material[key].encode(), password=None)
        assert private.public_key() == cert.public_key()
    assert make_kafka_tls("hive", NAMESPACE)[CA_FILE] != material[CA_FILE], "a new CA each time"


# ------------------------------------------------------------------------------------------ managed mode
def test_a_managed_kafka_wants_a_certificate_of_its_own_ca_from_clients_and_brokers() -> None:
    material = make_kafka_tls("hive", NAMESPACE)
    children = render({}, material)
    secret = children[("Secret", "hive-kafka-tls")]
    assert secret["immutable"] is True and set(secret["data"]) == set(KAFKA_TLS_KEYS)
    broker = container(children, "StatefulSet", "hive-kafka", "kafka")
    props = image_properties(broker["env"])
    assert props["listeners"] == "CLIENT://:9092,CONTROLLER://:9093"
    assert props["inter.broker.listener.name"] == "CLIENT"
    assert props["listener.security.protocol.map"] == "CLIENT:SSL,CONTROLLER:PLAINTEXT"
    assert props["listener.name.client.ssl.client.auth"] == "required"
    assert props["listener.name.client.ssl.keystore.location"] == "/etc/kafka/tls/keystore.pem"
    assert props["listener.name.client.ssl.truststore.location"] == "/etc/kafka/tls/ca.crt"
    # The brokers mount their keystore and the CA; never the clients' key.
    volumes = {v["name"]: v for v in pod(children, "StatefulSet", "hive-kafka")["volumes"]}
    assert [i["key"] for i in volumes["kafka-tls"]["secret"]["items"]] == [CA_FILE, KEYSTORE_FILE]
    # Every client: the CA and the client certificate and key, not the brokers' key; flags or config that say so.
    for kind, name, which in CLIENTS:
        volumes = {v["name"]: v for v in pod(children, kind, name)["volumes"]}
        (source,) = volumes["kafka-client"]["projected"]["sources"]
        assert source["secret"]["name"] == "hive-kafka-tls"
        assert [i["key"] for i in source["secret"]["items"]] == [CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE]
        annotations = children[(kind, name)]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["borg.dev/kafka-ca-checksum"] == \
            children[("StatefulSet", "hive-kafka")]["spec"]["template"]["metadata"]["annotations"][
                "borg.dev/kafka-ca-checksum"]
        args = container(children, kind, name, which)["args"]
        if which != "agent":
            assert args[args.index("--kafka-tls"):] == [
                "--kafka-tls", "--kafka-ca-file", "/var/run/secrets/borg-kafka/ca.crt",
                "--kafka-cert-file", "/var/run/secrets/borg-kafka/client.crt",
                "--kafka-key-file", "/var/run/secrets/borg-kafka/client.key"]
    assert telemetry(children) | {"kafka": None} == {
        "kafka": None, "collective": "hive", "buffer_events": 10_000, "kafka_tls": True,
        "kafka_ca_file": "/var/run/secrets/borg-kafka/ca.crt",
        "kafka_cert_file": "/var/run/secrets/borg-kafka/client.crt",
        "kafka_key_file": "/var/run/secrets/borg-kafka/client.key"}
    # A new CA (the Secret deleted and made anew) rolls the brokers and every client.
    again = render({}, make_kafka_tls("hive", NAMESPACE))
    for kind, name in [("StatefulSet", "hive-kafka"), *((k, n) for k, n, _ in CLIENTS)]:
        assert again[(kind, name)]["spec"]["template"] != children[(kind, name)]["spec"]["template"]


def test_a_managed_kafka_with_tls_off_is_plaintext_with_no_secret_and_nothing_mounted() -> None:
    children = render({"kafka": {"tls": False}})
    assert ("Secret", "hive-kafka-tls") not in children
    props = image_properties(container(children, "StatefulSet", "hive-kafka", "kafka")["env"])
    assert props["listener.security.protocol.map"] == "CLIENT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert not any(key.startswith("listener.name.") for key in props)
    for kind, name, which in CLIENTS:
        assert "kafka-client" not in {v["name"] for v in pod(children, kind, name)["volumes"]}
        assert "--kafka-tls" not in container(children, kind, name, which)["args"]
    assert telemetry(children)["kafka_tls"] is False


def test_a_managed_tls_kafka_is_not_rendered_without_its_material() -> None:
    with pytest.raises(ValueError, match="needs its material"):
        render({})


# ------------------------------------------------------------------------------------------ strimzi mode
def test_strimzi_mode_hands_its_clients_strimzis_cluster_ca_and_the_kafka_users_certificate() -> None:
    children = render({"kafka": {"mode": "strimzi"}})
    assert children[("KafkaUser", "hive-telemetry")]["spec"] == {"authentication": {"type": "tls"}}
    for kind, name, which in CLIENTS:
        sources = {v["name"]: v for v in pod(children, kind, name)["volumes"]}["kafka-client"]["projected"]["sources"]
        # The Secrets Strimzi writes: its cluster CA's certificate, and the KafkaUser's (user.crt, user.key).
        assert sources == [
            {"secret": {"name": "hive-kafka-cluster-ca-cert", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"secret": {"name": "hive-telemetry", "items": [{"key": "user.crt", "path": "client.crt"},
                                                            {"key": "user.key", "path": "client.key"}]}}]
        if which != "agent":
            assert "--kafka-cert-file" in container(children, kind, name, which)["args"]
    assert telemetry(children)["kafka"] == "hive-kafka-kafka-bootstrap.borg.svc:9093"
    assert telemetry(children)["kafka_cert_file"] == "/var/run/secrets/borg-kafka/client.crt"
    plain = render({"kafka": {"mode": "strimzi", "tls": False}})
    assert ("KafkaUser", "hive-telemetry") not in plain and telemetry(plain)["kafka_tls"] is False


# ------------------------------------------------------------------------------------------ external mode
EXTERNAL = {"mode": "external", "bootstrapServers": "kafka.example:9093", "tls": True}


def test_an_external_kafka_over_tls_with_a_scram_login_from_a_secret() -> None:
    children = render({"kafka": {**EXTERNAL, "caSecret": "their-ca", "loginSecret": "their-login"}})
    assert ("Secret", "hive-kafka-tls") not in children and ("StatefulSet", "hive-kafka") not in children
    for kind, name, which in CLIENTS:
        env = {e["name"]: e.get("valueFrom") for e in container(children, kind, name, which)["env"]}
        assert env["BORG_KAFKA_USERNAME"] == {"secretKeyRef": {"name": "their-login", "key": "username"}}
        assert env["BORG_KAFKA_PASSWORD"] == {"secretKeyRef": {"name": "their-login", "key": "password"}}
        (source,) = {v["name"]: v for v in pod(children, kind, name)["volumes"]}["kafka-client"]["projected"][
            "sources"]
        assert source == {"secret": {"name": "their-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
        assert "borg.dev/kafka-ca-checksum" not in (
            children[(kind, name)]["spec"]["template"]["metadata"].get("annotations") or {})
    assert telemetry(children)["kafka_ca_file"] == "/var/run/secrets/borg-kafka/ca.crt"
    assert telemetry(children)["kafka_cert_file"] is None
    # The password is in no argument and in no config.
    text = yaml.safe_dump(list(children.values()))
    assert "--kafka-password" not in text and "password: " not in telemetry(children)


def test_an_external_kafka_with_a_client_certificate_and_the_systems_cas() -> None:
    children = render({"kafka": {**EXTERNAL, "clientCertSecret": "their-client"}})
    for kind, name, which in CLIENTS:
        (source,) = {v["name"]: v for v in pod(children, kind, name)["volumes"]}["kafka-client"]["projected"][
            "sources"]
        assert source == {"secret": {"name": "their-client", "items": [
            {"key": "tls.crt", "path": "client.crt"}, {"key": "tls.key", "path": "client.key"}]}}
        assert not any(e["name"].startswith("BORG_KAFKA_") for e in container(children, kind, name, which)["env"])
    assert telemetry(children) | {"kafka": None} == {
        "kafka": None, "collective": "hive", "buffer_events": 10_000, "kafka_tls": True, "kafka_ca_file": None,
        "kafka_cert_file": "/var/run/secrets/borg-kafka/client.crt",
        "kafka_key_file": "/var/run/secrets/borg-kafka/client.key"}


@pytest.mark.parametrize(("kafka", "message"), [
    ({"caSecret": "x"}, "kafka.caSecret is for external mode"),
    ({**EXTERNAL, "tls": False, "loginSecret": "x"}, "kafka.loginSecret needs kafka.tls: true"),
    ({"mode": "external", "bootstrapServers": "k:9092", "clientCertSecret": "x"},
     "kafka.clientCertSecret needs kafka.tls: true"),
    ({**EXTERNAL, "clientCertSecret": "x", "loginSecret": "y"}, "clientCertSecret or loginSecret, not both"),
    ({"mode": "strimzi", "loginSecret": "x"}, "kafka.loginSecret is for external mode"),
])  # fmt: skip
def test_kafka_settings_that_cannot_work_are_one_line(kafka: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec({"kafka": kafka})
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------ the clients
def test_client_certificate_settings_that_cannot_work_are_refused_in_one_line(tmp_path: Path) -> None:
    cert = tmp_path / "client.crt"
    cert.write_text("not checked here")
    with pytest.raises(ConfigError, match=r"telemetry\.kafka_cert_file needs telemetry\.kafka_tls"):
        build_config(environ={}, overrides={"telemetry.kafka": "k:9092", "telemetry.kafka_cert_file": str(cert)})
    with pytest.raises(ConfigError, match=r"telemetry\.kafka_key_file needs telemetry\.kafka_cert_file"):
        build_config(environ={}, overrides={"telemetry.kafka": "k:9092", "telemetry.kafka_tls": True,
                                            "telemetry.kafka_key_file": str(cert)})
    # The indexer's flags: a missing file, and a certificate with a SCRAM login, exit 2 with one line.
    login = {"BORG_KAFKA_USERNAME": "a", "BORG_KAFKA_PASSWORD": "b"}
    for extra, env, said in ((["--kafka-cert-file", str(tmp_path / "nope.crt")], {}, "the Kafka client certificate"),
                             (["--kafka-cert-file", str(cert)], login,
                              "a client certificate or with BORG_KAFKA_USERNAME, not both"),
                             (["--kafka-cert-file", str(cert)], {}, "the Kafka TLS files cannot be loaded")):
        done = subprocess.run([sys.executable, "-m", "borgdqn", "indexer", "--kafka", "k:9092", "--es",
                               "http://127.0.0.1:9", "--kafka-tls", *extra], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", **env}, timeout=60)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert said in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
