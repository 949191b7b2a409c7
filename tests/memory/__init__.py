"""Tests of borgdqn.memory: the codec, the sum tree, the shared ring, the Redis link and the model store."""
