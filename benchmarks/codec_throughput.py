"""Frame compression for the replay memory's wire format: encode/decode MB/s and ratio per codec.

Frames are compressed per trajectory chunk (T consecutive frames as one buffer), as borgdqn.memory.codec does.
Pong-like frames are synthetic but shaped like the real thing: a flat background, a score band, two paddles and
a ball that move a little each step. Random noise is the worst case (nothing to find).

    python benchmarks/codec_throughput.py [--steps 64] [--seconds 0.5]

"pong-ale" (real frames, random play) needs ale-py; "none" decodes nothing, so its decode rate is meaningless.
"enc steps/s" is frames per second through the encoder on one core; the memory needs >= 60k steps/s on two.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import lz4.block
import numpy as np
import zstandard


def pong_frames(steps: int, seed: int = 0) -> np.ndarray:
    """[steps, 84, 84] uint8 frames: background 87, score band, two paddles and a ball in motion."""
    rng = np.random.default_rng(seed)
    frames = np.empty((steps, 84, 84), dtype=np.uint8)
    left, right = 30.0, 50.0
    ball = np.array([40.0, 40.0])
    vel = np.array([1.3, 2.1])
    for t in range(steps):
        f = frames[t]
        f[:] = 87  # grey-ish background after luminance conversion
        f[:14] = 52  # score band
        f[2:10, 18:24] = 120 + (t // 50) % 3 * 10  # scores change rarely
        f[2:10, 60:66] = 120
        f[14:16] = 236  # top and bottom walls
        f[80:82] = 236
        left = float(np.clip(left + rng.normal(0, 2), 16, 70))
        right = float(np.clip(ball[0] - 5 + rng.normal(0, 1), 16, 70))
        f[int(left) : int(left) + 8, 8:10] = 147
        f[int(right) : int(right) + 8, 74:76] = 123
        ball += vel
        for i, (lo, hi) in enumerate(((16.0, 78.0), (10.0, 74.0))):
            if not lo <= ball[i] <= hi:
                vel[i] = -vel[i]
                ball[i] = float(np.clip(ball[i], lo, hi))
        f[int(ball[0]) : int(ball[0]) + 2, int(ball[1]) : int(ball[1]) + 1] = 236
    # Downscaling 210x160 to 84x84 (INTER_AREA) blends the pixels at object edges; a 2x2 box filter does the same.
    wide = frames.astype(np.uint16)
    wide[:, :-1] += wide[:, 1:]
    wide[:, :, :-1] += wide[:, :, 1:]
    frames[:, :-1, :-1] = wide[:, :-1, :-1] // 4
    return frames


def ale_pong_frames(steps: int, seed: int = 0) -> np.ndarray | None:
    """Real Pong frames through the agents' own preprocessing (random play), or None without ale-py."""
    try:
        from borgdqn.config import EnvConfig
        from borgdqn.rl.envs import make_vector_env
    except ImportError:
        return None
    env = make_vector_env(EnvConfig(id="ALE/Pong-v5", num_envs=1), seed=seed)
    rng = np.random.default_rng(seed)
    env.reset()
    burn_in = 200  # past the serve, so that paddles and ball move
    frames = [env.step(rng.integers(0, env.spec.num_actions, 1)).frames[0] for _ in range(burn_in + steps)]
    env.close()
    return np.stack(frames[burn_in:])


def noise_frames(steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(steps, 84, 84), dtype=np.uint8)


Codec = tuple[Callable[[bytes], bytes], Callable[[bytes, int], bytes]]


def codecs() -> dict[str, Codec]:
    z1, z3, dz = zstandard.ZstdCompressor(level=1), zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    return {
        "none": (lambda b: b, lambda b, n: b),
        "zstd-1": (z1.compress, lambda b, n: dz.decompress(b, max_output_size=n)),
        "zstd-3": (z3.compress, lambda b, n: dz.decompress(b, max_output_size=n)),
        "lz4": (
            lambda b: lz4.block.compress(b, store_size=False),
            lambda b, n: lz4.block.decompress(b, uncompressed_size=n),
        ),
    }


def rate(fn: Callable[[], object], units: int, seconds: float) -> float:
    """``units`` per second through ``fn``, each call handling ``units`` (repeated for ``seconds``)."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 3:
        fn()
        n += 1
    return n * units / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="frames per chunk")
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    args = parser.parse_args()
    print(f"{'frames':<8} {'codec':<7} {'encode MB/s':>11} {'decode MB/s':>11} {'ratio':>7} {'B/step':>7} "
          f"{'enc steps/s':>11}")
    inputs = {"pong-ale": ale_pong_frames(args.steps), "pong-syn": pong_frames(args.steps)}
    inputs["noise"] = noise_frames(args.steps)
    for name, frames in inputs.items():
        if frames is None:
            continue
        raw = frames.tobytes()
        for codec, (enc, dec) in codecs().items():
            packed = enc(raw)
            enc(raw), dec(packed, len(raw))  # warm up (allocator, codec contexts)
            assert dec(packed, len(raw)) == raw
            # tobytes() is part of encoding: the writer starts from an ndarray.
            e = rate(lambda enc=enc, frames=frames: enc(frames.tobytes()), len(raw), args.seconds) / 1e6  # type: ignore[misc]
            d = rate(functools.partial(dec, packed, len(raw)), len(raw), args.seconds) / 1e6
            print(f"{name:<8} {codec:<7} {e:>11.0f} {d:>11.0f} {len(raw) / len(packed):>7.1f} "
                  f"{len(packed) / args.steps:>7.0f} {e * 1e6 / frames[0].nbytes:>11.0f}")
    full_path(next(f for f in inputs.values() if f is not None), args.seconds)  # real Pong frames when available


def full_path(frames: np.ndarray, seconds: float) -> None:
    """Whole wire path (protobuf + numpy + codec) for one chunk of these frames, in steps/s on one core."""
    from borgdqn.memory.codec import CodecName, decode_chunk, encode_chunk
    from borgdqn.memory.protocol import TrajectoryChunk

    t = len(frames)
    chunk = TrajectoryChunk(
        stream_id=1, agent_id=0, frames=frames, actions=np.zeros(t, np.int64), rewards=np.zeros(t, np.float32),
        first=np.zeros(t, bool), last=np.zeros(t, bool), terminated=np.zeros(t, bool),
        policy_ids=np.zeros(t, np.uint8),
    )  # fmt: skip
    print(f"\nencode_chunk/decode_chunk, {t}-step chunks of {frames.shape[1:]} {frames.dtype}:")
    codecs: tuple[CodecName, ...] = ("lz4", "zstd", "none")
    for codec in codecs:
        data = encode_chunk(chunk, codec=codec)
        e = rate(functools.partial(encode_chunk, chunk, codec=codec), t, seconds)
        d = rate(functools.partial(decode_chunk, data, frames.shape[1:], frames.dtype), t, seconds)
        print(f"  {codec:<5} encode {e:>9.0f} steps/s  decode {d:>9.0f} steps/s  {len(data) / t:>6.0f} B/step")


if __name__ == "__main__":
    main()
