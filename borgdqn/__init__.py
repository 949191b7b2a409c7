"""Borg-DQN: a hive of DQN agents learning from one shared replay memory."""

__version__ = "0.1.0"
