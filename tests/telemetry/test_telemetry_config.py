"""The telemetry section of the config and its flags: `train --kafka`, one-line errors, the collective name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from borgdqn.config import ConfigError, build_config
from borgdqn.telemetry.producer import collective_from_path, parse_bootstrap, producer_for
from tests.support.cli import assert_one_line_error, borgdqn


def test_telemetry_is_off_by_default_and_needs_no_producer() -> None:
    config = build_config(environ={})
    assert (config.telemetry.kafka, config.telemetry.collective, config.telemetry.buffer_events) == ("", "", 10_000)
    assert producer_for(config, "agent", 0) is None


def test_kafka_addresses_are_checked_and_normalised() -> None:
    config = build_config(environ={"BORG_TELEMETRY__KAFKA": "kafka-0:9092, kafka-1:9092"})
    assert config.telemetry.kafka == "kafka-0:9092,kafka-1:9092"
    assert parse_bootstrap("[::1]:9092") == ["[::1]:9092"]
    for bad in ("kafka", "kafka:0", "kafka:70000", "http://kafka:9092", ","):
        with pytest.raises(ValueError):
            parse_bootstrap(bad)
        with pytest.raises(ConfigError, match=r"^telemetry\.kafka: "):
            build_config(environ={}, overrides={"telemetry.kafka": bad})
    with pytest.raises(ConfigError, match=r"^telemetry\.collective: use 1-63 letters"):
        build_config(environ={}, overrides={"telemetry.collective": "my hive"})
    with pytest.raises(ConfigError, match=r"^telemetry\.buffer_events: "):
        build_config(environ={}, overrides={"telemetry.buffer_events": 10})


def test_the_collective_defaults_to_the_run_directory_name() -> None:
    assert collective_from_path(Path("/runs/pong-8")) == "pong-8"
    assert collective_from_path(Path("/runs/my run!")) == "my-run"
    assert collective_from_path(Path("/runs/" + "x" * 80)) == "x" * 63


def test_train_kafka_sets_telemetry_kafka(tmp_path: Path) -> None:
    result = borgdqn("train", "--kafka", "localhost:9092", "--out", str(tmp_path / "run"), "--print-config")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["telemetry"]["kafka"] == "localhost:9092"
    assert "--kafka HOST:PORT" in borgdqn("train", "--help").stdout
    assert_one_line_error(borgdqn("train", "--kafka", "localhost", "--print-config"), "telemetry.kafka",
                          "is not HOST:PORT")  # fmt: skip
