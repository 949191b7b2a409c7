"""Tests of borgdqn.rl: envs, frames, networks, policies, the learner and its update, learning, checkpoints,
assimilation."""
