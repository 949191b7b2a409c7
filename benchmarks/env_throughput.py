"""Environment throughput: our env layer (as an agent drives it) against plain ale-py, in one run.

    python benchmarks/env_throughput.py --seconds 20 --envs 8

*ours*: ``make_vector_env`` (single frames, NEXT_STEP bookkeeping) + ``FrameStacker(4)`` + what an agent does per
step besides acting: clip rewards, sum raw returns until game over, write frames and flags into a chunk buffer.
*plain*: ale-py's ``AtariVectorEnv`` with the same preprocessing and native ``stack_num=4``.
Both take random actions, with the same number of envs and worker threads. The two are measured in alternating
rounds so that a load change on the machine hits both alike. "per core" divides by the CPU time the process
used (all its threads), which stays meaningful when other processes share the cores.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
from ale_py.vector_env import AtariVectorEnv

from borgdqn.config import EnvConfig
from borgdqn.rl.envs import ale_game, env_seeds, make_vector_env
from borgdqn.rl.frame_stack import FrameStacker

CHUNK = 32  # steps per chunk, as the agent's adder buffers them
STACK = 4


def ours(config: EnvConfig, threads: int, seed: int) -> tuple[Callable[[], None], Callable[[], None]]:
    env = make_vector_env(config, seed, num_threads=threads)
    e = env.num_envs
    rng = np.random.default_rng(seed)
    stacker = FrameStacker(e, STACK, env.spec.frame_shape, env.spec.frame_dtype)
    obs = stacker.reset(env.reset())
    chunk_frames = np.zeros((e, CHUNK, *env.spec.frame_shape), env.spec.frame_dtype)
    chunk_rewards = np.zeros((e, CHUNK), np.float32)
    chunk_flags = np.zeros((3, e, CHUNK), bool)
    episode_return = np.zeros(e)
    first, last, terminated = np.ones(e, bool), np.zeros(e, bool), np.zeros(e, bool)
    t = 0
    returns: list[float] = []

    def step() -> None:
        nonlocal obs, first, last, terminated, t
        actions = rng.integers(0, env.spec.num_actions, e)
        result = env.step(actions)
        chunk_frames[:, t] = obs[:, -1]
        chunk_rewards[:, t] = np.clip(result.rewards, -1.0, 1.0)
        chunk_flags[:, :, t] = first, last, terminated
        t = (t + 1) % CHUNK
        episode_return[:] += result.rewards
        for i in np.flatnonzero(result.game_over):
            returns.append(float(episode_return[i]))
            episode_return[i] = 0.0
        first, last, terminated = result.first, result.terminated | result.truncated, result.terminated
        obs = stacker.push(result.frames, first)

    return step, env.close


def plain(config: EnvConfig, threads: int, seed: int) -> tuple[Callable[[], None], Callable[[], None]]:
    game = ale_game(config.id)
    if game is None:
        raise SystemExit(f"{config.id} is not an ALE id")
    env = AtariVectorEnv(
        game,
        config.num_envs,
        num_threads=threads,
        max_num_frames_per_episode=(config.max_episode_steps or 27_000) * config.frame_skip,
        repeat_action_probability=config.sticky_actions,
        img_height=config.screen_size,
        img_width=config.screen_size,
        stack_num=STACK,
        frameskip=config.frame_skip,
        noop_max=max(1, config.noop_max),
        reward_clipping=False,
    )
    e = config.num_envs
    num_actions = len(env.ale.get_action_set())
    rng = np.random.default_rng(seed)
    env.reset(seed=env_seeds(seed, e))

    def step() -> None:
        env.step(rng.integers(0, num_actions, e))

    return step, env.close


def measure(step: Callable[[], None], seconds: float) -> tuple[int, float, float]:
    """Steps of the vector env, wall seconds and process CPU seconds spent in about ``seconds``."""
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    deadline = wall0 + seconds
    while True:
        for _ in range(16):
            step()
        n += 16
        if time.perf_counter() >= deadline:
            break
    return n, time.perf_counter() - wall0, time.process_time() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time, split over both and rounds")
    parser.add_argument("--envs", type=int, default=8, help="environments per vector env")
    parser.add_argument("--threads", type=int, default=1, help="ALE worker threads (both sides)")
    parser.add_argument("--env-id", default="ALE/Pong-v5")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = EnvConfig(id=args.env_id, num_envs=args.envs)
    sides = {"ours": ours(config, args.threads, args.seed), "plain": plain(config, args.threads, args.seed)}
    totals = {name: np.zeros(3) for name in sides}  # vector steps, wall s, cpu s
    try:
        for step, _ in sides.values():
            measure(step, min(1.0, args.seconds / 10))  # warm-up: caches, first episodes
        per_round = args.seconds / (2 * args.rounds)
        for _ in range(args.rounds):
            for name, (step, _) in sides.items():
                totals[name] += measure(step, per_round)
    finally:
        for _, close in sides.values():
            close()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.env_id}  envs={args.envs}  threads={args.threads}  measured={args.seconds:g}s  "
        f"cores={cores}  load(1m)={load:.1f}"
    )
    rate = {k: v[0] * args.envs / v[1] for k, v in totals.items()}
    per_core = {k: v[0] * args.envs / max(v[2], 1e-9) for k, v in totals.items()}
    print(f"{'':8} {'env steps/s':>12} {'steps/s per core':>17} {'cpu/wall':>9}")
    for name, v in totals.items():
        print(f"{name:8} {rate[name]:12.0f} {per_core[name]:17.0f} {v[2] / v[1]:9.2f}")
    ratio, ratio_core = rate["ours"] / rate["plain"], per_core["ours"] / per_core["plain"]
    verdict = "ok" if min(ratio, ratio_core) >= 0.9 else "below target 0.9"
    print(f"{'ours/plain':8} {ratio:12.2f} {ratio_core:17.2f}            {verdict}")


if __name__ == "__main__":
    main()
