"""Tests of borgdqn.telemetry: events to Kafka, the indexer, Elasticsearch documents, Kibana objects, the
memory monitor."""
