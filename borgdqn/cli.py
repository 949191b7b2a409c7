"""The ``borgdqn`` command line: ``train`` a local hive, ``eval`` a checkpoint, ``plot`` learning curves.

Bad input (config, flags, paths) ends with one line on stderr and exit code 2; a failed run with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from borgdqn import __version__
from borgdqn.config import BorgConfig, ConfigError, build_config, parse_override, read_yaml

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

TRAIN_EPILOG = """\
configuration: defaults < --config FILE.yaml < BORG_* variables < flags. Any field can be set with
--set SECTION.FIELD=VALUE (repeatable), e.g. --set learner.lr=3e-4 --set env.frame_stack=1, or with
BORG_SECTION__FIELD=VALUE, e.g. BORG_LEARNER__LR=3e-4. Sections: env, network, learner, replay, policy,
epsilon_ladder, hive. See docs/configuration.md.

examples:
  borgdqn train                                   # Pong, 2 agents, defaults
  borgdqn train --env CartPole-v1 --agents 2 --steps 100000 --config examples/cartpole.yaml --out runs/cp
  borgdqn train --out runs/cp --resume --steps 200000   # continue a run, extend its budget
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors are bad input too: one line, exit 2
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="borgdqn", description="A hive of DQN agents learning from one shared replay memory.")
    parser.add_argument("--version", action="version", version=f"borgdqn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    train.add_argument("--memory", metavar="redis://HOST:PORT/DB",
                       help="share the Redis replay memory there instead of an embedded one "
                            "(password from BORG_REDIS_PASSWORD)")  # fmt: skip
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config field (repeatable), e.g. learner.lr=3e-4")  # fmt: skip
    live = train.add_mutually_exclusive_group()
    live.add_argument("--live", dest="live", action="store_const", const="on", help="force the live view")
    live.add_argument("--no-live", dest="live", action="store_const", const="off",
                      help="progress lines instead of the live view")  # fmt: skip
    train.add_argument("--print-config", action="store_true", help="print the merged config and exit")

    ev = sub.add_parser("eval", help="play a checkpoint greedily and print the returns")
    ev.add_argument("checkpoint", type=Path, help="DIR/checkpoints/agent-<i>-best.pt (or agent-<i>.pt, the latest)")
    ev.add_argument("--episodes", type=int, default=10, help="full games to play (default 10)")
    ev.add_argument("--epsilon", type=float, default=0.0, help="random-action probability (default 0)")
    ev.add_argument("--seed", type=int, default=12_345)

    plot = sub.add_parser("plot", help="write PNG learning curves of one or more runs")
    plot.add_argument("runs", type=Path, nargs="+", help="run directories (several: compared side by side)")
    plot.add_argument("--out", type=Path, help="where to write the PNGs (default: RUN/plots of the first run)")
    plot.add_argument("--labels", nargs="+", help="a label per run (default: the directory names)")
    return parser


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
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return build_config(saved_config, yaml_path=args.config, overrides=overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)
    if args.print_config:
        from borgdqn.config import dump_config

        sys.stdout.write(dump_config(config))
        return 0
    from borgdqn.hive import train

    summary = train(config, resume=args.resume)
    hive = summary["hive"]
    mean = hive["mean_return_last_20"]
    best = hive["best_mean_return_20"]
    status = "stopped (continue with --resume)" if summary.get("interrupted") else "done"
    print(
        f"{status}: {hive['env_steps']:,} env steps, {hive['episodes']} episodes, "
        f"mean return (last 20) {mean if mean is None else round(mean, 2)}, "
        f"best {best if best is None else round(best, 2)}, {summary['wall_seconds']:.0f}s "
        f"-> {config.hive.out / 'summary.json'}"
    )
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


def _cmd_plot(args: argparse.Namespace) -> int:
    from borgdqn.plotting import plot_runs

    out = args.out or args.runs[0] / "plots"
    if args.labels and len(args.labels) != len(args.runs):
        raise ConfigError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    for path in plot_runs(list(args.runs), out, labels=args.labels):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    commands = {"train": _cmd_train, "eval": _cmd_eval, "plot": _cmd_plot}
    try:
        return commands[args.command](args)
    except ConfigError as err:
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
