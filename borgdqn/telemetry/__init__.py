"""Telemetry: events to Kafka (producer), Kafka to Elasticsearch (indexer), Kibana's saved objects."""
