"""`python -m tests.harness up|down|status`: the test servers for manual work.

`up` starts the chosen parts (detached: they outlive the command), prints `export` lines on stdout (so that
`eval "$(python -m tests.harness up --redis)"` works) and progress on stderr, and records what runs in a
state file; `down` stops everything recorded there; `status` shows it with the memory each part uses.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.harness.cache import Progress, cache_root
from tests.harness.errors import HarnessError
from tests.harness.process import RunningPart, ServerProcess


def state_file() -> Path:
    return Path(os.environ.get("BORGDQN_HARNESS_STATE", cache_root() / "run" / "harness-state.json"))


def load_parts() -> list[RunningPart]:
    try:
        records = json.loads(state_file().read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise HarnessError(f"unreadable state file {state_file()}: {exc}") from exc
    parts = []
    for record in records:
        processes = [ServerProcess(name=p["name"], popen=None, pgid=p["pgid"], log=Path(p["log"]))
                     for p in record["processes"]]
        parts.append(RunningPart(name=record["name"], workdir=Path(record["workdir"]), processes=processes,
                                 exports=record["exports"]))
    return parts


def save_parts(parts: list[RunningPart]) -> None:
    path = state_file()
    if not parts:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"name": part.name, "workdir": str(part.workdir), "exports": part.exports,
                "processes": [{"name": p.name, "pgid": p.pgid, "log": str(p.log)} for p in part.processes]}
               for part in parts]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=2))
    tmp.chmod(0o600)  # exports carry the Redis password
    tmp.replace(path)


def _starters(args: argparse.Namespace) -> dict[str, Callable[[Progress], RunningPart]]:
    starters: dict[str, Callable[[Progress], RunningPart]] = {}
    if args.redis:
        from tests.harness.redis import ensure_redis, start_redis

        starters["redis"] = lambda progress: start_redis(ensure_redis(progress), aof=args.aof, detach=True)
    if args.kafka:
        from tests.harness.kafka import ensure_kafka, start_kafka

        starters["kafka"] = lambda progress: start_kafka(ensure_kafka(progress), detach=True)
    if args.es:
        from tests.harness.elasticsearch import ensure_elasticsearch, start_elasticsearch

        starters["elasticsearch"] = lambda progress: start_elasticsearch(ensure_elasticsearch(progress),
                                                                         detach=True)
    if args.kube or args.kube_full:
        from tests.harness.kube import ensure_kube, start_kube

        def kube(progress: Progress) -> RunningPart:
            cluster = start_kube(ensure_kube(progress, full=args.kube_full), detach=True)
            if args.kube_full:
                try:
                    cluster.add_full_tier(ensure_kube(progress, full=True), detach=True)
                except BaseException:
                    cluster.stop()
                    raise
            return cluster

        starters["kube"] = kube
    return starters


def _run_real_node(progress: Progress) -> int:
    """A control plane with a real node, in the foreground: a node changes the machine (iptables, sysctls, a
    bridge, mounts), so it runs only as long as this command does, and Ctrl-C undoes all of it."""
    import signal
    import threading

    from tests.harness.images import IMAGES, ensure_image
    from tests.harness.kube import ensure_kube, start_kube
    from tests.harness.node import ensure_node, node_ip, start_real_node

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    install = ensure_node(progress)
    images = [ensure_image(progress, name) for name in IMAGES]
    kube = ensure_kube(progress, full=True)
    cluster = start_kube(kube, node_ip=node_ip())
    try:
        cluster.add_control_loops(kube)
        node = start_real_node(cluster, install, images, progress=progress)
        try:
            _print_exports([cluster])
            for name, reference in node.images.items():
                print(f"# image {name}: {reference} (imagePullPolicy: Never or IfNotPresent)")
            sys.stdout.flush()
            progress.say(f"node {node.node_name} is Ready at {node.node_ip}; Ctrl-C stops it and restores the host")
            stop.wait()
        finally:
            node.stop()
    finally:
        cluster.stop()
    progress.say("real node stopped; the host is as it was")
    return 0


def _print_exports(parts: list[RunningPart]) -> None:
    for part in parts:
        for key, value in part.exports.items():
            print(f"export {key}={shlex.quote(value)}")


def cmd_up(args: argparse.Namespace) -> int:
    if args.real_node:
        try:
            return _run_real_node(Progress())
        except HarnessError as exc:
            print(f"harness: {exc}", file=sys.stderr)
            return 1
    starters = _starters(args)
    if not starters:
        print("harness: choose what to start: --redis --kafka --es --kube --kube-full --real-node", file=sys.stderr)
        return 2
    parts = [part for part in load_parts() if any(proc.alive() for proc in part.processes)]
    running = {part.name for part in parts}
    progress = Progress()
    for name, start in starters.items():
        if name in running:
            progress.say(f"{name} is already up (python -m tests.harness down stops it)")
            continue
        try:
            part = start(progress)
        except HarnessError as exc:
            save_parts(parts)
            print(f"harness: {exc}", file=sys.stderr)
            return 1
        parts.append(part)
        save_parts(parts)
        pids = ", ".join(f"{proc.name} {proc.pgid}" for proc in part.processes)
        progress.say(f"{name} is up (process groups: {pids}; {part.rss() / 2**20:.0f} MiB resident)")
    _print_exports(parts)
    return 0


def _installers(args: argparse.Namespace) -> dict[str, Callable[[Progress], object]]:
    everything = not (args.redis or args.kafka or args.es or args.kube or args.kube_full or args.real_node)
    installers: dict[str, Callable[[Progress], object]] = {}
    if everything or args.redis:
        from tests.harness.redis import ensure_redis

        installers["redis"] = ensure_redis
    if everything or args.kafka:
        from tests.harness.kafka import ensure_kafka

        installers["kafka"] = ensure_kafka
    if everything or args.es:
        from tests.harness.elasticsearch import ensure_elasticsearch

        installers["elasticsearch"] = ensure_elasticsearch
    if everything or args.real_node:
        from tests.harness.images import IMAGES, ensure_image
        from tests.harness.node import ensure_node, ensure_packages

        installers["node"] = ensure_node  # the node's packages; kubelet, kube-proxy, CoreDNS from Go
        # Mostly downloads and disk (debootstrap, PyPI's torch): they run beside the Go builds.
        def images(progress: Progress) -> list[object]:
            ensure_packages(progress)  # buildah, debootstrap
            return [ensure_image(progress, name) for name in IMAGES]

        installers["images"] = images
    if everything or args.kube or args.kube_full or args.real_node:
        from tests.harness.kube import ensure_kube

        full = everything or args.kube_full or args.real_node
        installers["kube"] = lambda progress: ensure_kube(progress, full=full)
        # The third-party CRDs the operator's tests install (ECK's from Go's module cache, Strimzi's generated).
        from tests.harness.kube import eck_crds, service_monitor_crd, strimzi_crds

        installers["crds"] = lambda progress: (eck_crds(progress), strimzi_crds(progress),
                                                  service_monitor_crd(progress))
    return installers


def cmd_install(args: argparse.Namespace) -> int:
    """Installs and builds without starting anything, so that the test session starts warm.

    The Go builds are CPU-bound and the downloads network-bound, so the two run side by side.
    """
    installers = _installers(args)
    progress = Progress()
    started = time.monotonic()
    go_parts = {name: fn for name, fn in installers.items() if name in ("kube", "node")}
    other_parts = {name: fn for name, fn in installers.items() if name not in go_parts}
    failures: list[str] = []

    def run_all(parts: dict[str, Callable[[Progress], object]]) -> None:
        for name, install in parts.items():
            try:
                install(progress)
            except HarnessError as exc:
                failures.append(f"{name}: {exc}")

    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(run_all, go_parts), pool.submit(run_all, other_parts)]:
            future.result()
    for failure in failures:
        print(f"harness: {failure}", file=sys.stderr)
    if failures:
        return 1
    progress.say(f"installed {', '.join(installers)} in {time.monotonic() - started:.0f}s (cache {cache_root()})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    parts = load_parts()
    progress = Progress()
    for part in reversed(parts):
        part.stop()
        progress.say(f"{part.name} stopped")
    save_parts([])
    if not parts:
        progress.say("nothing was up")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    parts = load_parts()
    if not parts:
        print("nothing is up")
        return 0
    for part in parts:
        alive = [proc for proc in part.processes if proc.alive()]
        state = "up" if len(alive) == len(part.processes) else f"DEGRADED ({len(alive)}/{len(part.processes)} alive)"
        print(f"{part.name}: {state}, {part.rss() / 2**20:.0f} MiB resident, dir {part.workdir}")
        for proc in part.processes:
            print(f"  {proc.name}: pgid {proc.pgid}, {proc.rss() / 2**20:.0f} MiB, log {proc.log}")
    _print_exports(parts)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start parts (installing or building them first if needed)")
    up.add_argument("--redis", action="store_true", help="redis-server with a password (REDIS_URL)")
    up.add_argument("--aof", action="store_true", help="with --redis: AOF persistence on")
    up.add_argument("--kafka", action="store_true", help="single-node KRaft Kafka (KAFKA_BOOTSTRAP)")
    up.add_argument("--es", action="store_true", help="single-node Elasticsearch (ES_URL)")
    up.add_argument("--kube", action="store_true", help="etcd + kube-apiserver, RBAC on (KUBECONFIG)")
    up.add_argument("--kube-full", action="store_true",
                    help="--kube plus controller-manager, scheduler and kwok fake GPU nodes")
    up.add_argument("--real-node", action="store_true",
                    help="a control plane of its own with a real node (containerd, kubelet, kube-proxy, CoreDNS) "
                         "running our images; in the foreground (root; Ctrl-C stops it and restores the host)")
    up.set_defaults(run=cmd_up)
    install = commands.add_parser("install", help="install and build parts without starting them (default: all)")
    for flag in ("--redis", "--kafka", "--es", "--kube", "--kube-full", "--real-node"):
        install.add_argument(flag, action="store_true")
    install.set_defaults(run=cmd_install)
    commands.add_parser("down", help="stop every part that `up` started").set_defaults(run=cmd_down)
    commands.add_parser("status", help="what is up, its processes and memory").set_defaults(run=cmd_status)
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
