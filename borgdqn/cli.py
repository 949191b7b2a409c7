"""The ``borgdqn`` command line: ``train`` a local hive, ``eval`` a checkpoint or an export, ``export`` a model,
``plot`` learning curves.

Bad input (config, flags, paths) ends with one line on stderr and exit code 2; a failed run with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from borgdqn import __version__
from borgdqn.bad_input import EXIT_BAD_INPUT, OneLineParser
from borgdqn.config import BorgConfig, ConfigError, build_config, parse_override, read_yaml
from borgdqn.memory.redis.client import RefusedAccess, UntrustedServer

if TYPE_CHECKING:
    from borgdqn.telemetry.kafka_access import KafkaAccess

EXIT_FAILED = 1

TRAIN_EPILOG = """\
configuration: defaults < the env id's preset < --config FILE.yaml < BORG_* variables < flags (the run says
which preset it used: CartPole-v1 has its own, ALE/* ids the Atari-tuned defaults). Any field can be set with
--set SECTION.FIELD=VALUE (repeatable), e.g. --set learner.lr=3e-4 --set env.frame_stack=1, or with
BORG_SECTION__FIELD=VALUE, e.g. BORG_LEARNER__LR=3e-4. Sections: env, network, learner, replay, policy,
epsilon_ladder, hive, telemetry. See docs/configuration.md.

examples:
  borgdqn train                                   # Pong, 2 agents, defaults
  borgdqn train --env CartPole-v1 --agents 2 --steps 100000 --out runs/cp   # the CartPole preset
  borgdqn train --out runs/cp --resume --steps 200000   # continue a run, extend its budget
  borgdqn train --kafka localhost:9092            # also stream live telemetry to Kafka (docs/telemetry.md)
  borgdqn train --config /etc/borgdqn/borgdqn.yaml --member "$POD_NAME"   # an agent pod of a collective
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="borgdqn", description="A hive of DQN agents learning from one shared replay memory.")
    parser.add_argument("--version", action="version", version=f"borgdqn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # Not required: argparse would then report a missing command before an unknown option (`borgdqn --bad`).
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    train = sub.add_parser(
        "train",
        help="train a local hive of agents sharing one replay memory",
        description="Start N agent processes that act, share one replay memory (embedded, or Redis with --memory) "
        "and learn from it.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--env", help="gymnasium id, e.g. ALE/Pong-v5 (default) or CartPole-v1")
    train.add_argument("--agents", type=int, help="agent processes (default 2)")
    train.add_argument("--steps", type=int, help="total env steps over the hive (default 2,000,000)")
    train.add_argument("--seed", type=int, help="base seed (default 0)")
    train.add_argument("--out", type=Path, help="run directory (default runs/hive)")
    train.add_argument("--config", type=Path, help="YAML file with any of the config sections")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    start.add_argument("--member", metavar="NAME",
                       help="run as one member of a collective (a Kubernetes pod, NAME its name): one agent on "
                            "the Redis memory whose seeds, replay streams and epsilon-ladder place derive from "
                            "NAME; resumes the run in --out if there is one (docs/operator.md)")  # fmt: skip
    train.add_argument("--wait-when-done", action="store_true",
                       help="with --member: once the budget is done, say so to the collective and keep running "
                            "until SIGTERM (a StatefulSet restarts a process that exits; the operator releases "
                            "the pods when every agent is done)")  # fmt: skip
    train.add_argument("--memory", metavar="redis://HOST:PORT/DB",
                       help="share the hive's experience through a Redis log there (each agent samples its "
                            "own replica of it) instead of an embedded memory (user and password from "
                            "BORG_REDIS_USERNAME and BORG_REDIS_PASSWORD)")
    train.add_argument("--kafka", metavar="HOST:PORT",
                       help="stream telemetry events (episodes, training, memory) to this Kafka; never slows "
                            "training (telemetry.kafka; HOST:PORT[,HOST:PORT])")  # fmt: skip
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config field (repeatable), e.g. learner.lr=3e-4")  # fmt: skip
    live = train.add_mutually_exclusive_group()
    live.add_argument("--live", dest="live", action="store_const", const="on", help="force the live view")
    live.add_argument("--no-live", dest="live", action="store_const", const="off",
                      help="progress lines instead of the live view")  # fmt: skip
    train.add_argument("--print-config", action="store_true", help="print the merged config and exit")

    ev = sub.add_parser("eval", help="play a checkpoint or an export greedily and print the returns")
    ev.add_argument("checkpoint", type=Path, help="DIR/checkpoints/agent-<i>-best.pt (or agent-<i>.pt, the latest), "
                                                   "or a directory that `borgdqn export` wrote")
    ev.add_argument("--episodes", type=int, default=10, help="full games to play (default 10)")
    ev.add_argument("--epsilon", type=float, default=0.0, help="random-action probability in [0, 1] (default 0)")
    ev.add_argument("--seed", type=int, default=12_345)

    exp = sub.add_parser(
        "export", help="write an agent's network as a portable model (safetensors + JSON)",
        description="Write an agent's online network to OUT/model.safetensors and what rebuilds it and plays (the "
        "game, its preprocessing, the network's settings) to OUT/model.json. From a run directory: the best "
        "checkpoint of the agent with the best mean return over 20 episodes, or --agent's. From a collective "
        "(--memory, --name): the latest checkpoint of its best agent in the model store, or --agent's. "
        "`borgdqn eval OUT` plays it.")  # fmt: skip
    exp.add_argument("run", type=Path, nargs="?", help="a run directory (not with --memory)")
    exp.add_argument("--memory", metavar="redis://HOST:PORT/DB",
                     help="a collective's memory: export from its model store (user and password from "
                     "BORG_REDIS_USERNAME and BORG_REDIS_PASSWORD)")
    exp.add_argument("--name", help="with --memory: the collective's name (its replay.redis_name)")
    exp.add_argument("--agent", type=int, help="export this agent instead of the best one")
    exp.add_argument("--ca-file", type=Path, metavar="PEM",
                     help="with a rediss:// --memory: the CA certificate that signed the memory's (the collective's "
                          "Secret NAME-memory-tls, key ca.crt)")
    exp.add_argument("--out", type=Path, required=True, help="directory to write (created if missing)")

    plot = sub.add_parser("plot", help="write PNG learning curves of one or more runs")
    plot.add_argument("runs", type=Path, nargs="+", help="run directories (several: compared side by side)")
    plot.add_argument("--out", type=Path, help="where to write the PNGs (default: RUN/plots of the first run)")
    plot.add_argument("--labels", nargs="+", help="a label per run (default: the directory names)")

    dash = sub.add_parser("dashboard", help="draw the Kibana dashboard's views of a local run as PNGs",
                          description="The views of Kibana's \"Borg collective\" dashboard, from a local run's "
                          "metrics: return per agent, the hive's best and mean return, epsilon, loss, env "
                          "steps/s, memory size and growth, per-agent memory share. No Kibana needed.")  # fmt: skip
    dash.add_argument("run", type=Path, help="the run directory (holds metrics/agent-*.jsonl)")
    dash.add_argument("--out", type=Path, help="where to write the PNGs (default: RUN/dashboard)")

    kib = sub.add_parser("kibana-setup", help="import the dashboard's saved objects into Kibana (retrying)",
                         description="Wait until Kibana answers (GET /api/status), then import the data views, "
                         "visualizations and the \"Borg collective\" dashboard (overwriting earlier copies). "
                         "Credentials: BORG_KIBANA_USERNAME and BORG_KIBANA_PASSWORD (basic auth).")  # fmt: skip
    kib.add_argument("--kibana", metavar="URL", default=os.environ.get("BORG_KIBANA_URL"),
                     help="Kibana's base URL, e.g. https://pong-kibana-kb-http:5601 (default $BORG_KIBANA_URL)")
    kib.add_argument("--timeout", type=float, default=600.0, metavar="S",
                     help="give up when Kibana has not answered within S seconds (600)")
    kib.add_argument("--ca-file", type=Path, metavar="PATH", help="CA certificate for Kibana's TLS (ECK's ca.crt)")
    kib.add_argument("--file", type=Path, metavar="NDJSON",
                     help="import this saved-objects file instead of the built-in dashboard")

    mon = sub.add_parser("memory-monitor", help="log the Redis log's stats and its agents' link reports",
                         description="Read the Redis log's size, rates, bytes, per-agent shares and what the "
                         "agents' links report (samples, drops, skips, outages, lag) and "
                         "log them (one key=value line per reading). The password comes from BORG_REDIS_PASSWORD "
                         "or --password-file, never from the URL; the user from BORG_REDIS_USERNAME (unset: "
                         "Redis' default user). A refused user, password or command exits 1.")  # fmt: skip
    mon.add_argument("--memory", required=True, metavar="redis://HOST:PORT/DB", help="the memory's Redis")
    mon.add_argument("--name", default="hive", help="the memory's name, replay.redis_name (default hive)")
    mon.add_argument("--interval", type=float, default=10.0, metavar="S", help="seconds between readings (10)")
    mon.add_argument("--once", action="store_true", help="one reading, then exit (1 if none can be made)")
    mon.add_argument("--password-file", type=Path, metavar="PATH", help="read the password from this file")
    _add_kafka_access(mon)
    mon.add_argument("--ca-file", type=Path, metavar="PEM",
                     help="with a rediss:// --memory: the CA certificate that signed the memory's")
    mon.add_argument("--kafka", metavar="HOST:PORT",
                     help="also send each reading to this Kafka as a MemoryReport event (HOST:PORT[,HOST:PORT])")
    mon.add_argument("--collective", metavar="NAME",
                     help="the collective's name on those events (default: --name)")

    idx = sub.add_parser("indexer", help="write telemetry events from Kafka to Elasticsearch",
                         description="A Kafka consumer group that writes telemetry events to Elasticsearch (bulk "
                         "API, one index per event kind, ids from (source, seq): replays never duplicate). "
                         "Credentials come from BORG_ES_USERNAME/BORG_ES_PASSWORD or BORG_ES_API_KEY, never "
                         "from flags. Stops on SIGTERM/SIGINT. See docs/indexer.md.")  # fmt: skip
    idx.add_argument("--kafka", required=True, metavar="HOST:PORT", help="Kafka bootstrap server(s)")
    idx.add_argument("--es", required=True, metavar="URL", help="Elasticsearch, e.g. https://borg-es-http:9200")
    idx.add_argument("--group", default="borg-indexer", help="consumer group id (default borg-indexer)")
    idx.add_argument("--topic-prefix", default="borg.telemetry.", metavar="PREFIX",
                     help="topics are PREFIX<kind> (default borg.telemetry.)")  # fmt: skip
    idx.add_argument("--ca-file", type=Path, metavar="PATH", help="CA certificate(s) to trust (ECK's self-signed)")
    _add_kafka_access(idx)
    idx.add_argument("--replicas", type=int, default=0, help="replicas of each index (default 0)")
    idx.add_argument("--batch", type=int, default=5000, metavar="N", help="Kafka records per bulk request (5000)")
    idx.add_argument("--report-every", type=float, default=10.0, metavar="S", help="seconds between progress lines")
    return parser


def _add_kafka_access(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kafka-tls", action="store_true",
                        help="TLS to Kafka; with BORG_KAFKA_USERNAME/BORG_KAFKA_PASSWORD a SASL/SCRAM-SHA-512 login")
    parser.add_argument("--kafka-ca-file", type=Path, metavar="PEM", help="with --kafka-tls: the brokers' CA")
    parser.add_argument("--kafka-cert-file", type=Path, metavar="PEM",
                        help="with --kafka-tls: this client's certificate, for a Kafka that wants mutual TLS")
    parser.add_argument("--kafka-key-file", type=Path, metavar="PEM",
                        help="with --kafka-cert-file: its key (default: in the certificate's file)")


def _kafka_access(args: argparse.Namespace) -> KafkaAccess:
    from borgdqn.telemetry.kafka_access import KafkaAccess, KafkaAccessError

    try:
        return KafkaAccess.of(tls=args.kafka_tls, ca_file=args.kafka_ca_file, cert_file=args.kafka_cert_file,
                              key_file=args.kafka_key_file)
    except KafkaAccessError as err:
        raise ConfigError(str(err)) from None


def _train_config(args: argparse.Namespace) -> BorgConfig:
    saved_config: dict[str, Any] = {}
    if args.resume:
        out = args.out or BorgConfig().hive.out
        saved = out / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {out} holds no run to resume (no {saved.name})")
        saved_config = read_yaml(saved)
    overrides: dict[str, Any] = {}
    for text in args.overrides:
        key, value = parse_override(text)
        overrides[key] = value
    flags = {
        "env.id": args.env,
        "hive.agents": args.agents,
        "hive.steps": args.steps,
        "hive.seed": args.seed,
        "hive.out": str(args.out) if args.out else None,
        "hive.live": args.live,
        "replay.backend": "redis" if args.memory else None,
        "replay.redis_url": args.memory,
        "telemetry.kafka": args.kafka,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    # A resumed run's saved config already holds every setting: no preset under it.
    return build_config(saved_config, yaml_path=args.config, overrides=overrides, preset=not args.resume)


def _cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)
    from borgdqn.presets import preset_for

    # Said once the run starts (the hive's first line), or with --print-config; a resumed run took no preset.
    chosen = preset_for(config.env.id)
    preset = None if args.resume else chosen.name if chosen else "none"
    if args.print_config:
        from borgdqn.config import dump_config

        if preset is not None:
            print(f"borgdqn: {config.env.id}: preset {preset}; --config, BORG_* and --set go over it",
                  file=sys.stderr)
        sys.stdout.write(dump_config(config))
        return 0
    from borgdqn.hive import mark_finished, member_finished, train, wait_until_released

    if args.wait_when_done and not args.member:
        raise ConfigError("--wait-when-done: only a collective's member (--member) waits to be released")
    summary = train(config, resume=args.resume, member=args.member, preset=preset)
    hive = summary["hive"]
    mean = hive["mean_return_last_20"]
    best = hive["best_mean_return_20"]
    status = "stopped (continue with --resume)" if summary.get("interrupted") else "done"
    if summary.get("target_reached") and not summary.get("interrupted"):
        reached, agents = summary["agents_reached"], len(summary["agents"])
        who = ("an agent" if config.hive.stop_when == "first" else
               "every agent" if reached == agents else f"{reached} of {agents} agents")
        status = f"done ({who} reached a mean return of {config.hive.stop_at_mean_return:g})"
    print(
        f"{status}: {hive['env_steps']:,} env steps, {hive['episodes']} episodes, "
        f"mean return (last 20) {mean if mean is None else round(mean, 2)}, "
        f"best {best if best is None else round(best, 2)}, {summary['wall_seconds']:.0f}s "
        f"-> {config.hive.out / 'summary.json'}", flush=True
    )
    finished = member_finished(config, summary) if args.member else None
    if finished is not None:
        # A collective's member says it is done; with --wait-when-done its pod then stays up until released.
        if args.wait_when_done:
            wait_until_released(config, args.member, finished)
        else:
            mark_finished(config, args.member, finished)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from borgdqn.evaluate import evaluate

    returns = evaluate(
        args.checkpoint,
        args.episodes,
        epsilon=args.epsilon,
        seed=args.seed,
        on_episode=lambda i, r: print(f"episode {i}: return {r:g}", flush=True),
    )
    mean = sum(returns) / len(returns)
    print(f"mean return over {len(returns)} episodes: {mean:.2f} (min {min(returns):g}, max {max(returns):g})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from borgdqn.rl.checkpoint import check_learner_state, parse_checkpoint, read_checkpoint
    from borgdqn.rl.envs import make_vector_env
    from borgdqn.rl.export import NetSpec, export_model, pick_checkpoint
    from borgdqn.rl.networks import build_q_network

    if (args.run is None) == (args.memory is None):
        raise ConfigError("export: give a run directory or --memory redis://HOST:PORT/DB (with --name), not both")
    if args.memory is not None:
        if not args.name:
            raise ConfigError("export: --memory needs --name, the collective's name")
        data, source = _from_model_store(args.memory, args.name, args.agent, args.ca_file)
        config, state = parse_checkpoint(data, source)
    else:
        path = pick_checkpoint(args.run, args.agent)
        source = str(path)
        config, state = read_checkpoint(path)
    env = make_vector_env(config.env.model_copy(update={"num_envs": 1}), seed=0)
    spec = NetSpec(tuple(env.spec.frame_shape), env.spec.is_image, env.spec.num_actions)
    env.close()
    check_learner_state(state.learner, build_q_network(config.network, spec, config.env.frame_stack), source)
    out = export_model(config, state, spec, args.out, source)
    best = "none yet" if state.best_mean is None else f"{state.best_mean:.2f}"
    print(f"exported agent {state.agent} ({state.env_steps:,} env steps, best mean return {best}) from {source} "
          f"-> {out} (borgdqn eval {out})")
    return 0


def _from_model_store(url: str, name: str, agent: int | None, ca_file: Path | None) -> tuple[bytes, str]:
    """(checkpoint bytes, where they came from) of ``agent`` (None: the best) in collective ``name``'s model store."""
    from borgdqn.memory.redis.client import connect, safe_address, with_credentials
    from borgdqn.memory.redis.model_store import RedisModelStore

    store = RedisModelStore(connect(with_credentials(url), ca_file=ca_file), name, 1)
    try:
        if agent is None:
            best = store.best()
            if best is None:
                raise ConfigError(f"export: the model store of {name!r} at {safe_address(url)} has no best agent yet "
                                  "(no agent has 20 episodes): give --agent")
            agent = best[0]
        data = store.get(agent)
    finally:
        store.close()
    if data is None:
        raise ConfigError(f"export: the model store of {name!r} at {safe_address(url)} holds no checkpoint of agent "
                          f"{agent}")
    return data, f"agent {agent} in the model store of {name!r} at {safe_address(url)}"


def _cmd_plot(args: argparse.Namespace) -> int:
    from borgdqn.plotting import plot_runs

    out = args.out or args.runs[0] / "plots"
    if args.labels and len(args.labels) != len(args.runs):
        raise ConfigError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    for path in plot_runs(list(args.runs), out, labels=args.labels):
        print(path)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from borgdqn.dashboard import write_dashboard

    paths, notes = write_dashboard(args.run, args.out or args.run / "dashboard")
    for path in paths:
        print(path)
    for note in notes:
        print(f"note: {note}")
    return 0


def _cmd_kibana_setup(args: argparse.Namespace) -> int:
    from borgdqn.telemetry.kibana_setup import KibanaConfigError, KibanaSetupError, setup

    if not args.kibana:
        raise ConfigError("kibana-setup: give --kibana URL (or set BORG_KIBANA_URL)")
    try:
        result = setup(args.kibana, timeout_s=args.timeout, ca_file=args.ca_file, ndjson_file=args.file)
    except KibanaConfigError as err:
        raise ConfigError(str(err)) from None
    except KibanaSetupError as err:
        print(f"borgdqn: failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    from borgdqn.telemetry.kibana_objects import DASHBOARD_ID, DASHBOARD_TITLE

    base = args.kibana.rstrip("/")
    print(f"imported {result.success_count} saved objects into {base}; "
          f"dashboard \"{DASHBOARD_TITLE}\": {base}/app/dashboards#/view/{DASHBOARD_ID}")
    return 0


def _cmd_memory_monitor(args: argparse.Namespace) -> int:
    from borgdqn.telemetry.memory_monitor import MonitorError, serve

    try:
        return serve(args.memory, args.name, interval_s=args.interval, once=args.once,
                     password_file=args.password_file, ca_file=args.ca_file, kafka=args.kafka or "",
                     collective=args.collective or "", kafka_access=_kafka_access(args))  # fmt: skip
    except MonitorError as err:
        print(f"borgdqn: failed: {err}", file=sys.stderr)
        return EXIT_FAILED


def _cmd_indexer(args: argparse.Namespace) -> int:
    from borgdqn.telemetry.indexer import IndexerConfigError, IndexerSettings, run_indexer

    try:
        settings = IndexerSettings.from_env(args.kafka, args.es, group=args.group, topic_prefix=args.topic_prefix,
                                            ca_file=args.ca_file, replicas=args.replicas, batch_max=args.batch,
                                            report_every_s=args.report_every,
                                            kafka_access=_kafka_access(args))  # fmt: skip
    except IndexerConfigError as err:
        raise ConfigError(str(err)) from None
    run_indexer(settings)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    commands = {"train": _cmd_train, "eval": _cmd_eval, "export": _cmd_export, "plot": _cmd_plot,
                "dashboard": _cmd_dashboard, "kibana-setup": _cmd_kibana_setup,
                "memory-monitor": _cmd_memory_monitor, "indexer": _cmd_indexer}
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: " + ", ".join(commands))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return commands[args.command](args)
    except (ConfigError, RefusedAccess, UntrustedServer) as err:  # bad input, not an outage
        print(f"borgdqn: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, FileNotFoundError) as err:
        # Raised by env/checkpoint/plot validation with a user-facing message (e.g. an unknown env id).
        if args.verbose or os.environ.get("BORG_DEBUG"):
            raise
        print(f"borgdqn: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # a failed run: one line unless debugging
        if args.verbose or os.environ.get("BORG_DEBUG"):
            raise
        print(f"borgdqn: failed: {err.__class__.__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
