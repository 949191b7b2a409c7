"""End to end on the real control plane and node: charts, collectives, agent identity, real pods."""
