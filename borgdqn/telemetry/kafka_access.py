"""How borgdqn's Kafka clients (the telemetry producer, the indexer, the memory monitor) reach a Kafka that wants
TLS and a login: the one home of the security settings every client passes to aiokafka.

    plaintext              no TLS, no login (a Kafka only the collective's pods can reach)
    tls                    TLS, the brokers' certificates verified against ``ca_file`` (else the system's CAs)
    cert_file (+ key_file) mutual TLS: the client's certificate (and its key, unless in the same file), as an
                           operator-managed Kafka and Strimzi's `authentication: tls` want
    user + password        SASL/SCRAM-SHA-512 (the user from BORG_KAFKA_USERNAME, the password from
                           BORG_KAFKA_PASSWORD: never in a config, an argument or a log)

TLS with a login is SASL_SSL, Strimzi's and most managed Kafkas' way; a login without TLS (SASL_PLAINTEXT) is
refused, since SCRAM then shows the user name and the exchange to anyone on the path.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from borgdqn.config import TelemetryConfig

KAFKA_USERNAME_ENV = "BORG_KAFKA_USERNAME"
KAFKA_PASSWORD_ENV = "BORG_KAFKA_PASSWORD"
SASL_MECHANISM = "SCRAM-SHA-512"


class KafkaAccessError(ValueError):
    """Settings that cannot work together (one line, for a person)."""


@dataclass(frozen=True)
class KafkaAccess:
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str = ""
    password: str = field(default="", repr=False)  # never in a log line or a traceback's repr

    @classmethod
    def of(cls, *, tls: bool, ca_file: Path | None = None, cert_file: Path | None = None,
           key_file: Path | None = None, environ: Mapping[str, str] | None = None) -> KafkaAccess:  # fmt: skip
        """The settings for ``tls``, ``ca_file`` and the client certificate, the login from the environment;
        KafkaAccessError when they cannot work together."""
        environ = os.environ if environ is None else environ
        access = cls(tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                     username=environ.get(KAFKA_USERNAME_ENV, ""), password=environ.get(KAFKA_PASSWORD_ENV, ""))
        for what, path in (("CA file", ca_file), ("client certificate", cert_file), ("client key", key_file)):
            if path is not None and not tls:
                raise KafkaAccessError(f"a Kafka {what} needs TLS (telemetry.kafka_tls, --kafka-tls)")
            if path is not None and not path.is_file():
                raise KafkaAccessError(f"the Kafka {what} {path} does not exist")
        if key_file is not None and cert_file is None:
            raise KafkaAccessError("a Kafka client key needs its certificate (telemetry.kafka_cert_file, "
                                   "--kafka-cert-file)")
        if bool(access.username) != bool(access.password):
            raise KafkaAccessError(f"set both {KAFKA_USERNAME_ENV} and {KAFKA_PASSWORD_ENV}, or neither")
        if access.username and not tls:
            raise KafkaAccessError(f"a Kafka login ({KAFKA_USERNAME_ENV}) needs TLS (telemetry.kafka_tls, "
                                   "--kafka-tls): SCRAM without it shows the exchange to the network")
        if access.username and cert_file is not None:
            raise KafkaAccessError(f"log in to Kafka with a client certificate or with {KAFKA_USERNAME_ENV}, "
                                   "not both")
        if tls:  # files that are there but are no PEM (or a key of another certificate): say so now, in one line
            try:
                access.client_options()
            except (ssl.SSLError, OSError) as err:
                raise KafkaAccessError(f"the Kafka TLS files cannot be loaded: {err}") from None
        return access

    @classmethod
    def of_telemetry(cls, telemetry: TelemetryConfig) -> KafkaAccess:
        """The settings of a run's ``telemetry`` section, the login from the environment."""
        return cls.of(tls=telemetry.kafka_tls, ca_file=telemetry.kafka_ca_file, cert_file=telemetry.kafka_cert_file,
                      key_file=telemetry.kafka_key_file)

    @property
    def protocol(self) -> str:
        if self.username:
            return "SASL_SSL"
        return "SSL" if self.tls else "PLAINTEXT"

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of aiokafka's producer, consumer and admin client."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            # The standard client context: the brokers' certificate and name verified (against ca_file, else the
            # system's CAs), and ours presented when there is one.
            context = ssl.create_default_context(cafile=None if self.ca_file is None else str(self.ca_file))
            if self.cert_file is not None:
                context.load_cert_chain(str(self.cert_file), None if self.key_file is None else str(self.key_file))
            options["ssl_context"] = context
        if self.username:
            options.update(sasl_mechanism=SASL_MECHANISM, sasl_plain_username=self.username,
                           sasl_plain_password=self.password)
        return options
