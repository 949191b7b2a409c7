"""Bounds every replica of a collective's log shares (one home, read by the hive and by the operator's sizing)."""

# A replica links the streams of every agent of the collective (each agent: up to STREAMS_PER_AGENT envs).
MAX_REPLICA_STREAMS = 1 << 16
