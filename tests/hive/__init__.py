"""Tests of borgdqn.hive and borgdqn.live_view: one machine's hive end to end (embedded memory, Redis, Kafka,
crashes)."""
