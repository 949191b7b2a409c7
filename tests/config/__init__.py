"""Tests of borgdqn.config and borgdqn.presets: the one config model and the presets."""
