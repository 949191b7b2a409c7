"""The embedded replay backend: a shared-memory ring for the agent processes of one machine, and each agent's
private replica of the Redis log (``replay.py`` says how the parts fit)."""

from borgdqn.memory.shared.replay import SharedReplay
from borgdqn.memory.shared.segment import NoRoom, SharedReplayHandle, default_sequences

__all__ = ["NoRoom", "SharedReplay", "SharedReplayHandle", "default_sequences"]
