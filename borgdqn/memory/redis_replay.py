"""The replay memory over Redis: one bounded ring of compressed trajectory chunks shared by every agent.

Layout (every key shares the hash tag ``{name}``, so a script may touch them all):

    borg:{name}:config   JSON of the memory's shape; the first client writes it, later ones must match it
    borg:{name}:head     chunks ever written; chunk g lives in slot g % slots (the oldest is overwritten first)
    borg:{name}:c:<slot> the chunk: a ``borg.v1.TrajectoryChunk`` (LZ4 frames, see ``codec``)
    borg:{name}:gseq     int64 per slot: which chunk g the slot holds (-1 while empty)
    borg:{name}:steps    uint16 per slot: the chunk's own steps
    borg:{name}:agent    uint16 per slot: the agent that wrote it (per-agent shares in ``stats``)
    borg:{name}:prio     float32 per step (slot * chunk_length + j): priority ** alpha; 0 where no step starts
    borg:{name}:maxprio  the largest priority seen (new steps get it, as in the embedded memory)
    borg:{name}:stats    counters: inserted steps, sampled transitions, rejected chunks

Each chunk is stored with the steps a transition that starts in it needs from its neighbours: ``context``
steps before it (frame stacks) and ``lookahead`` steps after it (n-step returns). So a sample reads exactly one
value per transition, in O(1), and never looks for a neighbour that may have been evicted. The writer holds a
stream's newest chunk back until the stream's next chunk (its lookahead) arrives, or writes it at once when it
ends an episode. The borrowed steps cost (stack - 1 + n) / chunk_length more frames, which LZ4 makes cheap
(adjacent frames compress against each other).

A write is one script (reserve the slot, store the chunk and its metadata, atomically). A sampler keeps a local
copy of the per-slot and per-step arrays (a few MB at most), refreshed every ``refresh_s``, draws keys from it
in proportion to priority, fetches the distinct chunks in one pipeline, and drops any whose slot was rewritten
meanwhile (its gseq changed) or whose bytes do not decode (counted in ``bad_reads``, never sampled).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from borgdqn.memory.codec import BadChunk, DecodedChunk, decode_chunk, encode_chunk
from borgdqn.memory.protocol import MemoryStats, SequenceBatch, TrajectoryChunk, TransitionBatch
from borgdqn.memory.sampling_rules import check_transition_args, importance_weights
from borgdqn.memory.sumtree import SumTree, tree_buffer_size

log = logging.getLogger(__name__)

_MAX_ROUNDS = 16

# KEYS: head, gseq, steps, agent, prio, stats, chunk-key prefix. ARGV: slots, chunk_length, chunk bytes, own
# steps, agent id, priorities (float32 x chunk_length). Returns the chunk's g.
_WRITE = """
local g = redis.call('INCR', KEYS[1]) - 1
local slots = tonumber(ARGV[1])
local slot = g % slots
local t = tonumber(ARGV[2])
redis.call('SET', KEYS[7] .. slot, ARGV[3])
redis.call('SETRANGE', KEYS[2], slot * 8, struct.pack('<i8', g))
redis.call('SETRANGE', KEYS[3], slot * 2, struct.pack('<I2', tonumber(ARGV[4])))
redis.call('SETRANGE', KEYS[4], slot * 2, struct.pack('<I2', tonumber(ARGV[5])))
redis.call('SETRANGE', KEYS[5], slot * t * 4, ARGV[6])
redis.call('HINCRBY', KEYS[6], 'inserted', tonumber(ARGV[4]))
return g
"""

# KEYS: maxprio. ARGV: candidate. Keeps the maximum.
_MAX = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local new = tonumber(ARGV[1])
if new > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"""


@dataclass(frozen=True)
class RedisReplayConfig:
    """The memory's shape: every client of one memory must agree on it."""

    capacity: int  # steps
    chunk_length: int
    frame_shape: tuple[int, ...]
    frame_dtype: str
    prioritized: bool
    alpha: float
    priority_eps: float
    context: int  # frame stack - 1
    lookahead: int  # n-step

    @property
    def slots(self) -> int:
        return max(1, -(-self.capacity // self.chunk_length))


@dataclass
class _Stream:
    """What the writer keeps of one env stream between chunks."""

    pending: TrajectoryChunk | None = None
    tail: TrajectoryChunk | None = None  # the stream's last written steps (up to ``context``)
    chunk_seq: int = 0


@dataclass
class _View:
    """A sampler's local copy of the per-slot and per-step arrays."""

    gseq: np.ndarray
    steps: np.ndarray
    tree: SumTree | None
    weights: np.ndarray  # leaf values (priority ** alpha, or 1 per valid step when uniform)
    population: int
    fetched: float = field(default_factory=time.monotonic)


def _cat(parts: list[TrajectoryChunk]) -> TrajectoryChunk:
    def join(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    policies = None if any(p.policy_ids is None for p in parts) else join("policy_ids")
    return TrajectoryChunk(
        stream_id=parts[0].stream_id, agent_id=parts[0].agent_id, frames=join("frames"), actions=join("actions"),
        rewards=join("rewards"), first=join("first"), last=join("last"), terminated=join("terminated"),
        policy_ids=policies, recurrent_state=parts[0].recurrent_state)


def _slice(chunk: TrajectoryChunk, lo: int, hi: int) -> TrajectoryChunk:
    return TrajectoryChunk(
        stream_id=chunk.stream_id, agent_id=chunk.agent_id, frames=chunk.frames[lo:hi], actions=chunk.actions[lo:hi],
        rewards=chunk.rewards[lo:hi], first=chunk.first[lo:hi], last=chunk.last[lo:hi],
        terminated=chunk.terminated[lo:hi],
        policy_ids=None if chunk.policy_ids is None else chunk.policy_ids[lo:hi], recurrent_state=None)


class RedisReplay:
    """Implements ``ReplayMemory`` on a Redis server (see the module docstring for the layout)."""

    def __init__(self, client: Any, name: str, config: RedisReplayConfig, *, seed: int = 0,
                 refresh_s: float = 0.5, cache_bytes: int = 64 << 20) -> None:
        self._r = client
        self._cfg = config
        self._dtype = np.dtype(config.frame_dtype)
        self._shape = tuple(config.frame_shape)
        self._rng = np.random.default_rng(seed)
        self._refresh_s = refresh_s
        self._streams: dict[int, _Stream] = {}
        self._view: _View | None = None
        self._max_priority = 1.0
        # Decoded chunks by slot, with the g they hold: a slot's chunk never changes until the slot is rewritten
        # (its gseq changes), so a sampler decodes each chunk once, not once per draw.
        self._cache: OrderedDict[int, tuple[int, DecodedChunk]] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._sampled_unreported = 0
        self.bad_reads = 0  # stored chunks that did not decode: skipped, never sampled
        self.rejected_local = 0
        base = f"borg:{{{name}}}"
        self._k = {part: f"{base}:{part}" for part in ("config", "head", "gseq", "steps", "agent", "prio",
                                                        "maxprio", "stats")}
        self._chunk_prefix = f"{base}:c:"
        self._write = client.register_script(_WRITE)
        self._raise_max = client.register_script(_MAX)
        self._declare()

    @classmethod
    def connect(cls, url: str, name: str, config: RedisReplayConfig, *, seed: int = 0,
                timeout_s: float = 30.0) -> RedisReplay:
        """Connect to ``url`` (``redis://:PASSWORD@HOST:PORT/DB``), retrying for up to ``timeout_s``.

        Raises ConnectionError with one line (the address without the password, and why) after that.
        """
        import redis

        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        where = _safe_address(url)
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while True:
            try:
                client.ping()
                break
            except redis.AuthenticationError as exc:
                raise ConnectionError(f"redis at {where} refused the password: {exc}") from None
            except redis.RedisError as exc:
                if time.monotonic() + delay > deadline:
                    raise ConnectionError(
                        f"redis at {where} unreachable after {timeout_s:.0f}s: {' '.join(str(exc).split())}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        return cls(client, name, config, seed=seed)

    # ------------------------------------------------------------------------------------------ setup
    def _declare(self) -> None:
        cfg = self._cfg
        wanted = json.dumps({
            "capacity": cfg.capacity, "chunk_length": cfg.chunk_length, "frame_shape": list(cfg.frame_shape),
            "frame_dtype": np.dtype(cfg.frame_dtype).str, "prioritized": cfg.prioritized, "alpha": cfg.alpha,
            "priority_eps": cfg.priority_eps, "context": cfg.context, "lookahead": cfg.lookahead,
        }, sort_keys=True)
        if self._r.set(self._k["config"], wanted, nx=True):
            slots = cfg.slots
            pipe = self._r.pipeline()
            pipe.set(self._k["gseq"], np.full(slots, -1, dtype="<i8").tobytes())
            pipe.set(self._k["steps"], np.zeros(slots, dtype="<u2").tobytes())
            pipe.set(self._k["agent"], np.zeros(slots, dtype="<u2").tobytes())
            pipe.set(self._k["prio"], np.zeros(slots * cfg.chunk_length, dtype="<f4").tobytes())
            pipe.set(self._k["maxprio"], "1.0")
            pipe.execute()
            return
        stored = self._r.get(self._k["config"])
        if stored is not None and json.loads(stored) != json.loads(wanted):
            raise ValueError(
                f"the Redis memory was created with {stored.decode()}, not {wanted}: use another memory name "
                "or delete its keys")

    # ------------------------------------------------------------------------------------------ writing
    def add(self, chunk: TrajectoryChunk) -> None:
        try:
            chunk.validate(self._shape, self._dtype)
        except ValueError as err:
            self.rejected_local += 1
            self._r.hincrby(self._k["stats"], "rejected", 1)
            log.warning("redis replay rejected a chunk from agent %s: %s", getattr(chunk, "agent_id", "?"), err)
            return
        stream = self._streams.setdefault(chunk.stream_id, _Stream())
        if stream.pending is not None:
            self._store(stream, stream.pending, chunk)
        if chunk.last[-1]:
            # Nothing after an episode's last step belongs to a transition that starts in this chunk.
            self._store(stream, chunk, None)
            stream.pending = None
        else:
            stream.pending = chunk

    def flush(self) -> None:
        """Writes every stream's held-back chunk (without lookahead: its last steps cannot start a transition)."""
        for stream in self._streams.values():
            if stream.pending is not None:
                self._store(stream, stream.pending, None)
                stream.pending = None

    def _store(self, stream: _Stream, own: TrajectoryChunk, following: TrajectoryChunk | None) -> None:
        cfg = self._cfg
        parts = []
        context = 0
        if stream.tail is not None and cfg.context:
            borrowed = _slice(stream.tail, max(0, len(stream.tail) - cfg.context), len(stream.tail))
            context = len(borrowed)
            parts.append(borrowed)
        parts.append(own)
        lookahead = 0
        if following is not None and cfg.lookahead:
            ahead = _slice(following, 0, min(cfg.lookahead, len(following)))
            lookahead = len(ahead)
            parts.append(ahead)
        stored = _cat(parts) if len(parts) > 1 else own
        data = encode_chunk(stored, chunk_seq=stream.chunk_seq, context_steps=context, lookahead_steps=lookahead)
        t = len(own)
        if t > cfg.chunk_length:
            raise ValueError(f"chunk of {t} steps is longer than the memory's chunk_length {cfg.chunk_length}")
        # New steps get the largest priority seen, so that each is sampled soon; a last step starts nothing.
        prio = np.zeros(cfg.chunk_length, dtype="<f4")
        start_value = self._max_priority ** cfg.alpha if cfg.prioritized else 1.0
        prio[:t] = np.where(own.last, 0.0, start_value)
        keys = [self._k[k] for k in ("head", "gseq", "steps", "agent", "prio", "stats")] + [self._chunk_prefix]
        self._write(keys=keys, args=[cfg.slots, cfg.chunk_length, data, t, own.agent_id, prio.tobytes()])
        stream.chunk_seq += 1
        stream.tail = own if stream.tail is None or len(own) >= cfg.context else _cat([stream.tail, own])

    # ------------------------------------------------------------------------------------------ sampling
    def _refresh(self, force: bool = False) -> _View:
        view = self._view
        if view is not None and not force and time.monotonic() - view.fetched < self._refresh_s:
            return view
        pipe = self._r.pipeline(transaction=False)
        for key in ("gseq", "steps", "prio", "maxprio"):
            pipe.get(self._k[key])
        self._report_sampled(pipe)
        gseq_b, steps_b, prio_b, maxprio_b = pipe.execute()[:4]
        cfg = self._cfg
        gseq = np.frombuffer(gseq_b, dtype="<i8").astype(np.int64)
        steps = np.frombuffer(steps_b, dtype="<u2").astype(np.int64)
        leaves = np.frombuffer(prio_b, dtype="<f4").astype(np.float64)
        if not cfg.prioritized:
            leaves = (leaves > 0).astype(np.float64)
        n = cfg.slots * cfg.chunk_length
        tree = SumTree(np.zeros(tree_buffer_size(n)), n)
        tree.set_range(0, leaves)
        self._max_priority = max(self._max_priority, float(maxprio_b or 1.0))
        self._view = _View(gseq=gseq, steps=steps, tree=tree, weights=leaves,
                           population=int(steps[gseq >= 0].sum()))
        return self._view

    def _fetch(self, slots: np.ndarray) -> dict[int, tuple[int, DecodedChunk | None]]:
        """(g, chunk) of each slot: the slot's current g, and its chunk (None if it does not decode)."""
        pipe = self._r.pipeline(transaction=False)
        for slot in slots.tolist():
            pipe.getrange(self._k["gseq"], slot * 8, slot * 8 + 7)
        current = [int(np.frombuffer(b, dtype="<i8")[0]) if b and len(b) == 8 else -1 for b in pipe.execute()]
        out: dict[int, tuple[int, DecodedChunk | None]] = {}
        missing = []
        for slot, g in zip(slots.tolist(), current, strict=True):
            cached = self._cache.get(slot)
            if cached is not None and cached[0] == g:
                self._cache.move_to_end(slot)
                out[slot] = cached
            else:
                missing.append((slot, g))
        if missing:
            # MULTI: a chunk and its slot's generation are read together, so a write racing this read can never
            # pair an old chunk with the new g (which would misattribute its keys).
            pipe = self._r.pipeline(transaction=True)
            for slot, _ in missing:
                pipe.get(f"{self._chunk_prefix}{slot}")
                pipe.getrange(self._k["gseq"], slot * 8, slot * 8 + 7)
            replies = pipe.execute()
            for i, (slot, _) in enumerate(missing):
                data, g_bytes = replies[2 * i], replies[2 * i + 1]
                g = int(np.frombuffer(g_bytes, dtype="<i8")[0]) if g_bytes and len(g_bytes) == 8 else -1
                decoded = self._decode(slot, data)
                out[slot] = (g, decoded)
                if decoded is not None:
                    self._remember(slot, g, decoded)
        return out

    def _decode(self, slot: int, data: bytes | None) -> DecodedChunk | None:
        if data is None:
            return None
        try:
            return decode_chunk(data, self._shape, self._dtype)
        except BadChunk as err:
            self.bad_reads += 1
            if self.bad_reads <= 10:
                log.warning("redis replay skipped slot %d: %s", slot, err)
            return None

    def _remember(self, slot: int, g: int, decoded: DecodedChunk) -> None:
        old = self._cache.pop(slot, None)
        if old is not None:
            self._cache_bytes -= old[1].chunk.frames.nbytes
        self._cache[slot] = (g, decoded)
        self._cache_bytes += decoded.chunk.frames.nbytes
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, (_, evicted) = self._cache.popitem(last=False)
            self._cache_bytes -= evicted.chunk.frames.nbytes

    def sample(self, batch_size: int, n_step: int, gamma: float, stack: int, beta: float) -> TransitionBatch:
        cfg = self._cfg
        check_transition_args(batch_size, n_step, gamma, stack, beta)
        if stack - 1 > cfg.context or n_step > cfg.lookahead:
            raise ValueError(f"this memory keeps context for stack <= {cfg.context + 1} and n_step <= "
                             f"{cfg.lookahead}; got {stack} and {n_step}")
        rows: list[dict[str, Any]] = []
        for round_ in range(_MAX_ROUNDS):
            view = self._refresh(force=round_ > 0)
            assert view.tree is not None
            total = view.tree.total()
            if total > 0:
                k = (batch_size - len(rows)) * (1 + round_) + 2
                leaves, values = view.tree.find(self._rng.random(k) * total)
                valid = values > 0
                leaves, values = leaves[valid], values[valid]
                slots = leaves // cfg.chunk_length
                fetched = self._fetch(np.unique(slots))
                for leaf, value, slot in zip(leaves.tolist(), values.tolist(), slots.tolist(), strict=True):
                    g, decoded = fetched[slot]
                    if decoded is None or g != view.gseq[slot]:
                        continue  # rewritten since the view was taken, or undecodable
                    row = _transition(decoded, leaf % cfg.chunk_length, n_step, gamma, stack)
                    if row is None:
                        continue
                    row["key"] = g * cfg.chunk_length + leaf % cfg.chunk_length
                    row["prob"] = value / total
                    rows.append(row)
                    if len(rows) == batch_size:
                        break
            if len(rows) == batch_size:
                break
        else:
            raise RuntimeError(f"could not draw {batch_size} valid transitions: the Redis memory holds too few that "
                               "can start one yet (fill it more before learning)")
        self._sampled_unreported += batch_size  # reported with the next refresh (one round trip fewer per batch)
        probs = np.array([r["prob"] for r in rows])
        return TransitionBatch(
            obs=np.stack([r["obs"] for r in rows]),
            actions=np.array([r["action"] for r in rows], dtype=np.int64),
            returns=np.array([r["return"] for r in rows], dtype=np.float32),
            discounts=np.array([r["discount"] for r in rows], dtype=np.float32),
            next_obs=np.stack([r["next_obs"] for r in rows]),
            weights=importance_weights(probs, beta, self._view.population if self._view else 1, cfg.prioritized),
            keys=np.array([r["key"] for r in rows], dtype=np.int64),
            agent_ids=np.array([r["agent"] for r in rows], dtype=np.int32),
        )

    def sample_sequences(self, batch_size: int, length: int, stack: int, beta: float) -> SequenceBatch:
        raise NotImplementedError("the Redis memory does not serve LSTM sequences yet; use replay.backend=shared")

    # ------------------------------------------------------------------------------------------ priorities
    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        """Set priorities of sampled keys; a key whose slot was rewritten since is ignored."""
        cfg = self._cfg
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        values = np.asarray(priorities, dtype=np.float64).reshape(-1)
        if keys.shape != values.shape:
            raise ValueError(f"{keys.shape[0]} keys but {values.shape[0]} priorities")
        if not cfg.prioritized or keys.size == 0:
            return
        finite = np.isfinite(values) & (keys >= 0)
        raw = np.abs(np.where(finite, values, 0.0)) + cfg.priority_eps
        leaves = (raw**cfg.alpha).astype("<f4")
        g = keys // cfg.chunk_length
        slots = g % cfg.slots
        distinct = np.unique(slots).tolist()
        pipe = self._r.pipeline(transaction=False)
        for slot in distinct:
            pipe.getrange(self._k["gseq"], slot * 8, slot * 8 + 7)
        current = {slot: int(np.frombuffer(b, dtype="<i8")[0])
                   for slot, b in zip(distinct, pipe.execute(), strict=True) if b and len(b) == 8}
        # A step's priority lives at its slot's offset; the gseq check skips keys evicted since sampling (a
        # rewrite racing this pipeline may still take one stale value, which the next sample corrects).
        pipe = self._r.pipeline(transaction=False)
        for i, (key, slot, chunk_g) in enumerate(zip(keys.tolist(), slots.tolist(), g.tolist(), strict=True)):
            if finite[i] and current.get(slot) == chunk_g:
                leaf = slot * cfg.chunk_length + key % cfg.chunk_length
                pipe.setrange(self._k["prio"], leaf * 4, leaves[i : i + 1].tobytes())
        pipe.execute()
        biggest = float(raw[finite].max(initial=0.0))
        if biggest > self._max_priority:
            self._max_priority = biggest
            self._raise_max(keys=[self._k["maxprio"]], args=[repr(biggest)])

    # ------------------------------------------------------------------------------------------ stats
    def _report_sampled(self, pipe: Any) -> None:
        if self._sampled_unreported:
            pipe.hincrby(self._k["stats"], "sampled", self._sampled_unreported)
            self._sampled_unreported = 0

    def stats(self) -> MemoryStats:
        cfg = self._cfg
        pipe = self._r.pipeline(transaction=False)
        self._report_sampled(pipe)
        pipe.get(self._k["gseq"])
        pipe.get(self._k["steps"])
        pipe.get(self._k["agent"])
        pipe.hgetall(self._k["stats"])
        gseq_b, steps_b, agent_b, counters = pipe.execute()[-4:]
        gseq = np.frombuffer(gseq_b, dtype="<i8")
        steps = np.frombuffer(steps_b, dtype="<u2").astype(np.int64)
        agents = np.frombuffer(agent_b, dtype="<u2").astype(np.int64)
        filled = gseq >= 0
        per_agent = np.bincount(agents[filled], weights=steps[filled]) if filled.any() else np.zeros(0)
        counts = {k.decode(): int(v) for k, v in counters.items()}
        return MemoryStats(
            size=int(steps[filled].sum()),
            capacity=cfg.slots * cfg.chunk_length,
            inserted=counts.get("inserted", 0),
            sampled=counts.get("sampled", 0),
            rejected=counts.get("rejected", 0),
            per_agent={int(a): int(c) for a, c in enumerate(per_agent) if c > 0},
        )

    def close(self) -> None:
        self.flush()
        pipe = self._r.pipeline(transaction=False)
        self._report_sampled(pipe)
        pipe.execute()
        self._r.close()


def _transition(decoded: DecodedChunk, j: int, n: int, gamma: float, stack: int) -> dict[str, Any] | None:
    """The n-step transition starting at own step ``j`` of a stored chunk, or None where it cannot start yet.

    Same rules as the embedded memory: no start at an episode's last step; the stack before an episode's first
    step repeats that step; the return stops at the episode's last step (discount 0 if it terminated, else
    gamma ** m, bootstrapping from the final observation).
    """
    c = decoded.chunk
    s = decoded.context_steps + j
    if j >= len(c) - decoded.context_steps - decoded.lookahead_steps or c.last[s]:
        return None
    m = 0
    while m < n:
        if s + m + 1 >= len(c):
            return None  # the steps after this one are not stored (yet)
        if c.first[s + m + 1]:
            return None  # an episode cannot start before the previous one's last step
        m += 1
        if c.last[s + m]:
            break
    obs = _stack(c, s, stack)
    next_obs = _stack(c, s + m, stack)
    if obs is None or next_obs is None:
        return None
    powers = np.power(np.float32(gamma), np.arange(m), dtype=np.float32)
    ret = float(np.dot(c.rewards[s : s + m], powers))
    discount = 0.0 if c.terminated[s + m] else float(np.float32(gamma) ** np.float32(m))
    return {"obs": obs, "next_obs": next_obs, "action": int(c.actions[s]), "return": ret, "discount": discount,
            "agent": c.agent_id}


def _stack(c: TrajectoryChunk, end: int, stack: int) -> np.ndarray | None:
    """Frames ``end - stack + 1 .. end``; before the episode's first step that step repeats (None if the stack
    needs steps from before what the chunk stores)."""
    lo = end - stack + 1
    idx = np.arange(lo, end + 1)
    for p in range(end, max(lo, 0) - 1, -1):
        if c.first[p]:
            return np.asarray(c.frames[np.maximum(idx, p)])
    if lo < 0:
        return None
    return np.asarray(c.frames[idx])


def _safe_address(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"

