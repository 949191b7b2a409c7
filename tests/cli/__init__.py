"""Tests of borgdqn.cli, borgdqn.plotting and borgdqn.dashboard: the command line and its figures."""
