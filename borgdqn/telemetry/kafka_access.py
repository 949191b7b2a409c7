"""How borgdqn's Kafka clients (the telemetry producer, the indexer, the memory monitor) reach a Kafka that wants
TLS and a SASL/SCRAM-SHA-512 login: the one home of the security settings every client passes to aiokafka.

    plaintext              no TLS, no login (a Kafka only the collective's pods can reach)
    tls                    TLS, the brokers' certificates verified against ``ca_file`` (else the system's CAs)
    user + password        SASL/SCRAM-SHA-512 (the user from BORG_KAFKA_USERNAME, the password from
                           BORG_KAFKA_PASSWORD: never in a config, an argument or a log)

TLS with a login is SASL_SSL, Strimzi's and most managed Kafkas' way; a login without TLS (SASL_PLAINTEXT) is
refused, since SCRAM then shows the user name and the exchange to anyone on the path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KAFKA_USERNAME_ENV = "BORG_KAFKA_USERNAME"
KAFKA_PASSWORD_ENV = "BORG_KAFKA_PASSWORD"
SASL_MECHANISM = "SCRAM-SHA-512"


class KafkaAccessError(ValueError):
    """Settings that cannot work together (one line, for a person)."""


@dataclass(frozen=True)
class KafkaAccess:
    tls: bool = False
    ca_file: Path | None = None
    username: str = ""
    password: str = field(default="", repr=False)  # never in a log line or a traceback's repr

    @classmethod
    def of(cls, *, tls: bool, ca_file: Path | None = None,
           environ: Mapping[str, str] | None = None) -> KafkaAccess:  # fmt: skip
        """The settings for ``tls`` and ``ca_file``, the login from the environment; KafkaAccessError when they
        cannot work together."""
        environ = os.environ if environ is None else environ
        access = cls(tls=tls, ca_file=ca_file, username=environ.get(KAFKA_USERNAME_ENV, ""),
                     password=environ.get(KAFKA_PASSWORD_ENV, ""))
        if ca_file is not None and not tls:
            raise KafkaAccessError("a Kafka CA file needs TLS (telemetry.kafka_tls, --kafka-tls)")
        if ca_file is not None and not ca_file.is_file():
            raise KafkaAccessError(f"the Kafka CA file {ca_file} does not exist")
        if bool(access.username) != bool(access.password):
            raise KafkaAccessError(f"set both {KAFKA_USERNAME_ENV} and {KAFKA_PASSWORD_ENV}, or neither")
        if access.username and not tls:
            raise KafkaAccessError(f"a Kafka login ({KAFKA_USERNAME_ENV}) needs TLS (telemetry.kafka_tls, "
                                   "--kafka-tls): SCRAM without it shows the exchange to the network")
        return access

    @property
    def protocol(self) -> str:
        if self.username:
            return "SASL_SSL"
        return "SSL" if self.tls else "PLAINTEXT"

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of aiokafka's producer, consumer and admin client."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(cafile=None if self.ca_file is None else str(self.ca_file))
        if self.username:
            options.update(sasl_mechanism=SASL_MECHANISM, sasl_plain_username=self.username,
                           sasl_plain_password=self.password)
        return options
