"""The collective's TLS, made once by the operator (as ECK makes Elasticsearch's): the memory's CA and server
certificate in the Secret `<cr>-memory-tls` (ca.crt, tls.crt, tls.key), and a managed Kafka's CA, broker
certificate and the one client certificate its producers and the indexer log in with, in `<cr>-kafka-tls`
(ca.crt, tls.crt, tls.key, client.crt, client.key).

The CA's private key signs the certificates and is then thrown away: nothing can sign another certificate under
this CA, so a stolen Secret lets nobody impersonate more than what it already holds. A new certificate (expiry,
a compromised key) is a new CA: delete the Secret, and the next reconcile makes it anew; the pods pick it up
when they restart (docs/security.md).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence

from borg_operator import names

CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"  # the Secret's keys, as cert-manager and ECK name them
CLIENT_CERT_FILE, CLIENT_KEY_FILE = "client.crt", "client.key"  # a client certificate beside them (mutual TLS)
KEYSTORE_FILE = "keystore.pem"  # Kafka's PEM keystore: the private key and the certificate in one file
KAFKA_TLS_KEYS = (CA_FILE, CERT_FILE, KEY_FILE, KEYSTORE_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE)
KAFKA_CLIENT = "borg-telemetry"  # the managed Kafka's client (its principal User:CN=borg-telemetry)
VALID_DAYS = 5 * 365
LOOPBACK = ("localhost", "127.0.0.1", "::1")  # the memory pod's own monitor sidecar and readiness probe


def memory_hostnames(cr: str, namespace: str) -> list[str]:
    """Every name a client may dial the memory by: its Services (short, namespaced and fully qualified), its pod
    through the headless Service, and the pod's loopback."""
    return _service_names(namespace, names.memory(cr), names.memory_headless(cr)) + list(LOOPBACK)


def _service_names(namespace: str, service: str, headless: str) -> list[str]:
    """A Service's names (short, namespaced and fully qualified) and its pods' through the headless Service."""
    return [name for host in (service, f"*.{headless}")
            for name in (host, f"{host}.{namespace}", f"{host}.{namespace}.svc",
                         f"{host}.{namespace}.svc.cluster.local")]


def make_memory_tls(cr: str, namespace: str, now: datetime.datetime | None = None) -> dict[str, str]:
    """{ca.crt, tls.crt, tls.key} as PEM text: a fresh CA and the memory's server certificate for
    `memory_hostnames`, valid for VALID_DAYS."""
    return make_server_tls(f"borg-dqn {namespace}/{cr} memory CA", names.memory(cr), memory_hostnames(cr, namespace),
                           now)


def kafka_hostnames(cr: str, namespace: str) -> list[str]:
    """Every name a client or a fellow broker dials a managed Kafka by: its client Service and each broker through
    the headless Service."""
    return _service_names(namespace, names.kafka(cr), names.kafka_headless(cr))


def make_kafka_tls(cr: str, namespace: str, now: datetime.datetime | None = None,
                   also: Sequence[str] = ()) -> dict[str, str]:  # fmt: skip
    """KAFKA_TLS_KEYS: a fresh CA, the brokers' certificate (also their client certificate between brokers),
    as tls.crt/tls.key and as Kafka's keystore.pem, and the telemetry clients' certificate (CN KAFKA_CLIENT).
    ``also``: more names for the brokers' certificate (a test's broker on the loopback)."""
    material = make_server_tls(f"borg-dqn {namespace}/{cr} kafka CA", names.kafka(cr),
                               [*kafka_hostnames(cr, namespace), *also], now, client=KAFKA_CLIENT)
    return {**material, KEYSTORE_FILE: material[KEY_FILE] + material[CERT_FILE]}


def make_server_tls(ca_name: str, server: str, hostnames: Sequence[str], now: datetime.datetime | None = None,
                    client: str | None = None) -> dict[str, str]:  # fmt: skip
    """{ca.crt, tls.crt, tls.key} as PEM text: a fresh CA ``ca_name`` (ECDSA P-256; its key discarded) and the
    certificate of ``server`` for ``hostnames`` (names or IP addresses), valid for VALID_DAYS. With ``client``,
    also {client.crt, client.key}: a client certificate of that common name under the same CA, and the server's
    certificate serves as a client's too (brokers dial each other)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)  # clock skew
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder().subject_name(issuer).issuer_name(issuer).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    alt_names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))

    def leaf(subject: str, public_key: ec.EllipticCurvePublicKey, usages: list[x509.ObjectIdentifier],
             sans: list[x509.GeneralName]) -> x509.Certificate:  # fmt: skip
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))  # fmt: skip
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    server_usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    cert = leaf(server, key.public_key(), server_usages, alt_names)
    pem = serialization.Encoding.PEM

    def private(k: ec.EllipticCurvePrivateKey) -> str:
        return k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()

    out = {CA_FILE: ca.public_bytes(pem).decode(), CERT_FILE: cert.public_bytes(pem).decode(), KEY_FILE: private(key)}
    if client:
        client_key = ec.generate_private_key(ec.SECP256R1())
        out[CLIENT_CERT_FILE] = leaf(client, client_key.public_key(), [ExtendedKeyUsageOID.CLIENT_AUTH],
                                     []).public_bytes(pem).decode()
        out[CLIENT_KEY_FILE] = private(client_key)
    return out
