"""The hive's experience log in Redis, and each agent's link to it (writer, tail, local replica).

``keys``: the key layout, read by agents, the memory monitor and the operator alike; ``client``: connecting and
what counts as an outage; ``writer``: appending chunks to the log; ``tail``: following the log into a replica;
``link``: an agent's ``ReplayMemory`` over all of them; ``sizing``: the Redis' ``maxmemory`` and an agent pod's
memory; ``model_store``: the agents' checkpoints, kept in the same Redis.
"""
