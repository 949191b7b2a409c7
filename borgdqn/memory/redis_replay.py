"""The replay memory over Redis: one bounded ring of compressed trajectory chunks shared by every agent.

Layout (every key shares the hash tag ``{name}``, so a script may touch them all):

    borg:{name}:config   JSON of the memory's shape; the first client writes it, later ones must match it
    borg:{name}:head     chunks ever written; chunk g lives in slot g % slots (the oldest is overwritten first)
    borg:{name}:c:<slot> the chunk: a ``borg.v1.TrajectoryChunk`` (LZ4 frames, see ``codec``)
    borg:{name}:gseq     int64 per slot: which chunk g the slot holds (-1 while empty)
    borg:{name}:steps    uint16 per slot: the chunk's own steps
    borg:{name}:agent    uint16 per slot: the agent that wrote it (per-agent shares in ``stats``)
    borg:{name}:prio     float32 per step (slot * chunk_length + j): priority ** alpha; 0 where no step starts
    borg:{name}:seqprio  float32 per slot, with sequences only: the priority ** alpha of the sequence that starts
                         at the slot's chunk's first step (0 if the chunk carries no recurrent state)
    borg:{name}:maxprio  the largest priority seen (new steps get it, as in the embedded memory)
    borg:{name}:stats    counters: inserted steps, sampled transitions, rejected chunks

Each chunk is stored with the steps a transition that starts in it needs from its neighbours: ``context``
steps before it (frame stacks) and ``lookahead`` steps after it (n-step returns). So a sample reads exactly one
value per transition, in O(1), and never looks for a neighbour that may have been evicted. The writer holds a
stream's newest chunks back until the steps after them (their lookahead) have arrived, or writes them at once
when an episode's last step comes first (or on ``flush`` / ``break_stream``, with what has arrived). The
borrowed steps cost (stack - 1 + n) / chunk_length more frames, which LZ4 makes cheap (adjacent frames compress
against each other).

Sequences (LSTM, ``recurrent_hidden`` set): a chunk that carries a ``recurrent_state`` (the state before its own
first step) starts one sequence there, with a priority of its own (``seqprio``; key ``g | SEQUENCE_KEY``, as in
the embedded memory). Its lookahead grows to the ``sequence_length - 1`` steps after that start (``max(n,
sequence_length - T)`` after the chunk, from as many following chunks as it takes), so a sequence is one read as
well; that costs up to (sequence_length - T) / T more frames: use chunks about as long as a sequence.

A write is one script (reserve the slot, store the chunk and its metadata, atomically). A sampler keeps a local
copy of the per-slot and per-step arrays (a few MB at most), refreshed every ``refresh_s``, draws keys from it
in proportion to priority, fetches the distinct chunks in one script call, and drops any whose slot was rewritten
meanwhile (its gseq changed) or whose bytes do not decode (counted in ``bad_reads``, never sampled).

Sample ages (see ``protocol``) cost no extra read: the local copy is read in one MULTI together with the
``inserted`` counter, which tells each stored chunk's place in the hive's insertion order (``_first_steps``), and the
fetch script returns ``inserted`` as of the fetch.
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
from borgdqn.memory.protocol import MemoryNotReady, MemoryStats, SequenceBatch, TrajectoryChunk, TransitionBatch
from borgdqn.memory.sampling_rules import check_transition_args, importance_weights
from borgdqn.memory.sumtree import SumTree, tree_buffer_size

log = logging.getLogger(__name__)

REDIS_PASSWORD_ENV = "BORG_REDIS_PASSWORD"  # where every client (agents, monitor) reads the memory's password

_MAX_ROUNDS = 16
# Keys of sampled sequences carry this bit (the embedded memory's ``SEQUENCE_KEY``), so that one
# update_priorities serves transitions (g * chunk_length + step) and sequences (g | SEQUENCE_KEY).
SEQUENCE_KEY = 1 << 62

# KEYS: head, gseq, steps, agent, prio, stats, chunk-key prefix, config, seqprio. ARGV: slots, chunk_length, chunk
# bytes, own steps, agent id, priorities (float32 x chunk_length), the chunk's sequence priority (float32; empty in
# a memory without sequences). Returns the chunk's g. Refuses to write into a memory whose layout is gone (a server
# restarted without persistence): SETRANGE would zero-fill the per-slot arrays.
_WRITE = """
if redis.call('EXISTS', KEYS[8]) == 0 then return redis.error_reply('BORG_NO_LAYOUT') end
local g = redis.call('INCR', KEYS[1]) - 1
local slots = tonumber(ARGV[1])
local slot = g % slots
local t = tonumber(ARGV[2])
redis.call('SET', KEYS[7] .. slot, ARGV[3])
redis.call('SETRANGE', KEYS[2], slot * 8, struct.pack('<i8', g))
redis.call('SETRANGE', KEYS[3], slot * 2, struct.pack('<I2', tonumber(ARGV[4])))
redis.call('SETRANGE', KEYS[4], slot * 2, struct.pack('<I2', tonumber(ARGV[5])))
redis.call('SETRANGE', KEYS[5], slot * t * 4, ARGV[6])
if ARGV[7] ~= '' then redis.call('SETRANGE', KEYS[9], slot * 4, ARGV[7]) end
redis.call('HINCRBY', KEYS[6], 'inserted', tonumber(ARGV[4]))
return g
"""

# KEYS: config, gseq, steps, agent, prio, maxprio, seqprio. ARGV: config JSON, gseq, zeros for steps and agent,
# zeros for prio, zeros for seqprio (empty: no sequences). Creates the memory unless its config exists; 1 if it did.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[3])
redis.call('SET', KEYS[5], ARGV[4])
redis.call('SET', KEYS[6], '1.0')
if #ARGV[5] > 0 then redis.call('SET', KEYS[7], ARGV[5]) end
return 1
"""

# KEYS: maxprio. ARGV: candidate. Keeps the maximum.
_MAX = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local new = tonumber(ARGV[1])
if new > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"""


def memory_keys(name: str) -> dict[str, str]:
    """The keys of memory ``name`` (see the module docstring); ``chunk_prefix`` + slot is a chunk's key."""
    base = f"borg:{{{name}}}"
    keys = {part: f"{base}:{part}" for part in ("config", "head", "gseq", "steps", "agent", "prio", "seqprio",
                                                 "maxprio", "stats")}
    keys["chunk_prefix"] = f"{base}:c:"
    return keys


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
    # LSTM: the recurrent state's size; chunks that carry a recurrent_state start sequences (None: no sequences).
    recurrent_hidden: int | None = None
    sequence_length: int = 0  # LSTM: the longest sequence sampled, burn_in + sequence_length + n_step

    def __post_init__(self) -> None:
        if self.recurrent_hidden is not None and self.recurrent_hidden < 1:
            raise ValueError(f"recurrent_hidden must be >= 1, got {self.recurrent_hidden}")
        if self.sequence_length < 0 or (self.sequence_length and self.recurrent_hidden is None):
            raise ValueError(f"sequence_length {self.sequence_length} needs recurrent_hidden and must be >= 0")

    @property
    def slots(self) -> int:
        return max(1, -(-self.capacity // self.chunk_length))

    def ahead(self, chunk: TrajectoryChunk) -> int:
        """Steps after ``chunk`` that its transitions and its sequence read: the stored chunk carries them."""
        if chunk.last[-1]:
            return 0  # nothing after an episode's last step belongs to a transition or sequence starting before
        need = self.lookahead
        if self.recurrent_hidden is not None and chunk.recurrent_state is not None and not chunk.last.any():
            need = max(need, self.sequence_length - len(chunk))  # the sequence's L - 1 steps after its start
        return need


@dataclass
class _Stream:
    """What the writer keeps of one env stream between chunks."""

    # Chunks not written yet, oldest first: each waits until the steps after it cover its lookahead.
    held: list[TrajectoryChunk] = field(default_factory=list)
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
    first_step: np.ndarray  # per slot: the insertion index of its chunk's first own step (``_first_steps``)
    fetched: float = field(default_factory=time.monotonic)


@dataclass
class _SequenceView:
    """A sampler's local copy of the per-slot sequence priorities (0 where a slot's chunk starts no sequence)."""

    gseq: np.ndarray
    tree: SumTree
    population: int  # sequences that may be drawn
    first_step: np.ndarray  # per slot: the insertion index of its chunk's first own step (``_first_steps``)
    fetched: float = field(default_factory=time.monotonic)


def _cat(parts: list[TrajectoryChunk]) -> TrajectoryChunk:
    def join(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    policies = None if any(p.policy_ids is None for p in parts) else join("policy_ids")
    return TrajectoryChunk(
        stream_id=parts[0].stream_id, agent_id=parts[0].agent_id, frames=join("frames"), actions=join("actions"),
        rewards=join("rewards"), first=join("first"), last=join("last"), terminated=join("terminated"),
        policy_ids=policies, recurrent_state=parts[0].recurrent_state)


def _lookahead(following: list[TrajectoryChunk], need: int) -> tuple[list[TrajectoryChunk], bool]:
    """The first ``need`` steps of the chunks that follow one, up to an episode's last step (nothing after it
    belongs to the chunk's transitions or sequence); and whether they are all the chunk will ever need."""
    parts: list[TrajectoryChunk] = []
    have = 0
    for chunk in following:
        if have >= need:
            break
        take = min(need - have, len(chunk))
        ends = np.flatnonzero(chunk.last[:take])
        if ends.size:
            parts.append(_slice(chunk, 0, int(ends[0]) + 1))
            return parts, True
        parts.append(_slice(chunk, 0, take))
        have += take
    return parts, have >= need


def _first_steps(gseq: np.ndarray, steps: np.ndarray, inserted: int) -> np.ndarray:
    """Per slot, the insertion index of its chunk's first own step (-1 where empty), from gseq, steps and the
    ``inserted`` counter read at one moment.

    Chunks are written in g order, each adding its own steps to ``inserted``, and the ring keeps the newest chunks,
    so every chunk newer than a stored one is stored too: a chunk's first step comes after all but its own steps and
    those of the newer chunks. One pass in ring order (slot ``head % slots`` holds the oldest chunk, or is empty).
    """
    filled = gseq >= 0
    if not filled.any():
        return np.full(gseq.shape, -1, dtype=np.int64)
    oldest = (int(gseq.max()) + 1) % gseq.size
    own = np.roll(np.where(filled, steps, 0), -oldest)
    this_and_newer = np.cumsum(own[::-1])[::-1]
    return np.where(filled, inserted - np.roll(this_and_newer, oldest), -1)


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
        self._seq_view: _SequenceView | None = None
        self._max_priority = 1.0
        # Decoded chunks by slot, with the g they hold: a slot's chunk never changes until the slot is rewritten
        # (its gseq changes), so a sampler decodes each chunk once, not once per draw.
        self._cache: OrderedDict[int, tuple[int, DecodedChunk]] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._sampled_unreported = 0
        self.bad_reads = 0  # stored chunks that did not decode: skipped, never sampled
        self.rejected_local = 0
        self._k = memory_keys(name)
        self._chunk_prefix = self._k["chunk_prefix"]
        self._write = client.register_script(_WRITE)
        self._create = client.register_script(_CREATE)
        self._raise_max = client.register_script(_MAX)
        self._declare()

    @classmethod
    def connect(cls, url: str, name: str, config: RedisReplayConfig, *, seed: int = 0,
                timeout_s: float = 30.0, cache_bytes: int = 64 << 20) -> RedisReplay:
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
        return cls(client, name, config, seed=seed, cache_bytes=cache_bytes)

    # ------------------------------------------------------------------------------------------ setup
    def ensure_layout(self) -> bool:
        """Recreate the memory's keys if they are gone (a restarted Redis without persistence); True if it did."""
        if self._r.exists(self._k["config"]):
            return False
        self._declare()
        self._view = None
        self._cache.clear()
        self._cache_bytes = 0
        return True

    def ping(self) -> None:
        self._r.ping()

    @property
    def max_priority(self) -> float:
        """The largest priority this client has seen (new steps are written with it)."""
        return self._max_priority

    def raise_max_priority(self, value: float) -> None:
        """Learn a larger priority seen elsewhere (another client of the same memory in this process)."""
        self._max_priority = max(self._max_priority, value)

    def _declare(self) -> None:
        cfg = self._cfg
        shape: dict[str, Any] = {
            "capacity": cfg.capacity, "chunk_length": cfg.chunk_length, "frame_shape": list(cfg.frame_shape),
            "frame_dtype": np.dtype(cfg.frame_dtype).str, "prioritized": cfg.prioritized, "alpha": cfg.alpha,
            "priority_eps": cfg.priority_eps, "context": cfg.context, "lookahead": cfg.lookahead,
        }
        if cfg.recurrent_hidden is not None:
            # Only in memories with sequences, so that memories created before sequences existed still match.
            shape.update(recurrent_hidden=cfg.recurrent_hidden, sequence_length=cfg.sequence_length)
        wanted = json.dumps(shape, sort_keys=True)
        slots = cfg.slots
        # One script creates the config and the arrays together: a client dying between the two must not leave a
        # config without arrays (later SETRANGEs would zero-fill them, and empty slots would read as chunk 0).
        keys = [self._k[k] for k in ("config", "gseq", "steps", "agent", "prio", "maxprio", "seqprio")]
        args = [wanted, np.full(slots, -1, dtype="<i8").tobytes(), np.zeros(slots, dtype="<u2").tobytes(),
                np.zeros(slots * cfg.chunk_length, dtype="<f4").tobytes(),
                np.zeros(slots, dtype="<f4").tobytes() if cfg.recurrent_hidden is not None else b""]
        if self._create(keys=keys, args=args):
            return
        stored = self._r.get(self._k["config"])
        if stored is not None and json.loads(stored) != json.loads(wanted):
            raise ValueError(
                f"the Redis memory was created with {stored.decode()}, not {wanted}: use another memory name "
                "or delete its keys")

    # ------------------------------------------------------------------------------------------ writing
    def add(self, chunk: TrajectoryChunk) -> None:
        try:
            self._check(chunk)
        except ValueError as err:
            self.rejected_local += 1
            self._r.hincrby(self._k["stats"], "rejected", 1)
            log.warning("redis replay rejected a chunk from agent %s: %s", getattr(chunk, "agent_id", "?"), err)
            return
        stream = self._streams.setdefault(chunk.stream_id, _Stream())
        self._drain(stream, chunk, final=False)

    def _check(self, chunk: TrajectoryChunk) -> None:
        chunk.validate(self._shape, self._dtype)
        cfg = self._cfg
        if len(chunk) > cfg.chunk_length:
            raise ValueError(f"chunk of {len(chunk)} steps is longer than the memory's chunk_length {cfg.chunk_length}")
        if chunk.recurrent_state is not None:
            if cfg.recurrent_hidden is None:
                raise ValueError("chunk carries a recurrent_state but the memory has no recurrent_hidden")
            state = np.asarray(chunk.recurrent_state)
            if state.shape != (2, cfg.recurrent_hidden) or state.dtype.kind != "f" or not np.isfinite(state).all():
                raise ValueError(f"recurrent_state must be finite floats of shape (2, {cfg.recurrent_hidden}), "
                                 f"got {state.shape}")

    def _drain(self, stream: _Stream, chunk: TrajectoryChunk | None, *, final: bool) -> None:
        """Write the stream's held chunks, then ``chunk``, in order, as long as the steps after each cover its
        lookahead (``cfg.ahead``), or an episode's last step comes first; with ``final``, all of them, each with
        the steps that follow it so far. The rest stays held.

        State changes only after each write succeeds: a caller may retry add() after a connection error without
        storing anything twice (short of a reply lost after the server applied the write).
        """
        queue = [*stream.held, chunk] if chunk is not None else list(stream.held)
        while queue:
            ahead, complete = _lookahead(queue[1:], self._cfg.ahead(queue[0]))
            if not complete and not final:
                break
            self._store(stream, queue.pop(0), ahead)
            if stream.held:
                stream.held.pop(0)  # it was held (``chunk`` comes after every held one)
        stream.held = queue

    def break_stream(self, stream_id: int) -> None:
        """The stream's next chunk does not follow its last one (chunks were dropped between them): write the
        held-back chunks without further lookahead and forget the stream's context, so nothing spans the gap."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._drain(stream, None, final=True)
        stream.tail = None

    def flush(self) -> None:
        """Writes every stream's held-back chunks, each with the steps written after it so far (its last steps
        may then start no transition, and its sequence is padded where the stream has not gone on yet)."""
        for stream in self._streams.values():
            self._drain(stream, None, final=True)

    def _store(self, stream: _Stream, own: TrajectoryChunk, ahead: list[TrajectoryChunk]) -> None:
        cfg = self._cfg
        parts = []
        context = 0
        if stream.tail is not None and cfg.context:
            borrowed = _slice(stream.tail, max(0, len(stream.tail) - cfg.context), len(stream.tail))
            context = len(borrowed)
            parts.append(borrowed)
        parts.append(own)
        parts.extend(ahead)
        lookahead = sum(len(part) for part in ahead)
        stored = own
        if len(parts) > 1:
            stored = _cat(parts)
            stored.recurrent_state = own.recurrent_state  # the state before own step 0 (stored step ``context``)
        data = encode_chunk(stored, chunk_seq=stream.chunk_seq, context_steps=context, lookahead_steps=lookahead)
        t = len(own)
        # New steps get the largest priority seen, so that each is sampled soon; a last step starts nothing.
        prio = np.zeros(cfg.chunk_length, dtype="<f4")
        start_value = self._max_priority ** cfg.alpha if cfg.prioritized else 1.0
        prio[:t] = np.where(own.last, 0.0, start_value)
        # A chunk with a recurrent state starts one sequence, at its first step, with a priority of its own.
        seq_prio = b""
        if cfg.recurrent_hidden is not None:
            seq_prio = np.array(0.0 if own.recurrent_state is None else start_value, dtype="<f4").tobytes()
        keys = [self._k[k] for k in ("head", "gseq", "steps", "agent", "prio", "stats")]
        keys += [self._chunk_prefix, self._k["config"], self._k["seqprio"]]
        args = [cfg.slots, cfg.chunk_length, data, t, own.agent_id, prio.tobytes(), seq_prio]
        try:
            self._write(keys=keys, args=args)
        except Exception as err:
            if "BORG_NO_LAYOUT" not in str(err):
                raise
            self.ensure_layout()
            log.warning("redis memory %s was gone (a server restarted without persistence): recreated it",
                        self._k["config"])
            self._write(keys=keys, args=args)
        stream.chunk_seq += 1
        if stream.tail is None or len(own) >= cfg.context:
            stream.tail = own
        else:
            joined = _cat([stream.tail, own])
            stream.tail = _slice(joined, max(0, len(joined) - cfg.context), len(joined))

    # ------------------------------------------------------------------------------------------ sampling
    def _refresh(self, force: bool = False) -> _View:
        view = self._view
        if view is not None and not force and time.monotonic() - view.fetched < self._refresh_s:
            return view
        # One MULTI: the chunks' places in the insertion order (``_first_steps``) need gseq, steps and the counter
        # from the same moment.
        pipe = self._r.pipeline(transaction=True)
        for key in ("gseq", "steps", "prio", "maxprio"):
            pipe.get(self._k[key])
        pipe.hget(self._k["stats"], "inserted")
        self._report_sampled(pipe)
        gseq_b, steps_b, prio_b, maxprio_b, inserted_b = pipe.execute()[:5]
        cfg = self._cfg
        if gseq_b is None or steps_b is None or prio_b is None:
            raise MemoryNotReady("the Redis memory's layout is gone (a restart without persistence?): its next "
                                 "write recreates it")
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
                           population=int(steps[gseq >= 0].sum()),
                           first_step=_first_steps(gseq, steps, int(inserted_b or 0)))
        return self._view

    def _fetch(self, slots: np.ndarray) -> tuple[dict[int, tuple[int, DecodedChunk | None]], int]:
        """(g, chunk) of each slot: the slot's current g, and its chunk (None if it does not decode); and the steps
        inserted so far (what sample ages count from).

        One round trip (the ``_FETCH`` script): it returns every slot's current g and the chunks of the slots whose
        cached copy is missing or stale, read together, so a write racing this read can never pair an old chunk
        with the new g (which would misattribute its keys).
        """
        slot_list = slots.tolist()
        cached = [self._cache.get(slot) for slot in slot_list]
        held = np.array([_NOT_HELD if entry is None else entry[0] for entry in cached], dtype="<i8")
        reply = self._r.eval(_FETCH, 3, self._k["gseq"], self._chunk_prefix, self._k["stats"],
                             np.asarray(slots, dtype="<i4").tobytes(), held.tobytes())
        current = np.frombuffer(reply[0] or b"", dtype="<i8").tolist()
        out: dict[int, tuple[int, DecodedChunk | None]] = {}
        missing = []
        for slot, g, had, entry in zip(slot_list, current, held.tolist(), cached, strict=True):
            if g == had and entry is not None:
                self._cache.move_to_end(slot)
                out[slot] = entry
            else:
                missing.append((slot, g))
        for (slot, g), data in zip(missing, reply[2:], strict=True):
            decoded = self._decode(slot, data)
            out[slot] = (g, decoded)
            if decoded is not None:
                self._remember(slot, g, decoded)
        return out, int(reply[1] or 0)

    def _decode(self, slot: int, data: bytes | None) -> DecodedChunk | None:
        if data is None:
            return None
        try:
            decoded = decode_chunk(data, self._shape, self._dtype)
        except BadChunk as err:
            self.bad_reads += 1
            if self.bad_reads <= 10:
                log.warning("redis replay skipped slot %d: %s", slot, err)
            return None
        return _Prepared.of(decoded, self._cfg.context, self._cfg.lookahead)

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
        parts: list[_Rows] = []
        got = 0
        for round_ in range(_MAX_ROUNDS):
            view = self._refresh(force=round_ > 0)
            assert view.tree is not None
            total = view.tree.total()
            if total > 0:
                k = (batch_size - got) * (1 + round_) + 2
                leaves, values = view.tree.find(self._rng.random(k) * total)
                valid = values > 0
                leaves, values = leaves[valid], values[valid]
                slots, starts = np.divmod(leaves, cfg.chunk_length)
                distinct, which = np.unique(slots, return_inverse=True)
                fetched, inserted = self._fetch(distinct)
                # The chunks that may serve a draw: decoded and still the chunk the view's priorities describe.
                chunks: list[_Prepared] = []
                gens: list[int] = []
                ages: list[int] = []  # of each chunk's first own step: the steps inserted after it
                position = np.full(distinct.size, -1, dtype=np.int64)
                for i, (slot, wanted) in enumerate(zip(distinct.tolist(), view.gseq[distinct].tolist(), strict=True)):
                    g, decoded = fetched[slot]
                    if g == wanted and isinstance(decoded, _Prepared):
                        position[i] = len(chunks)
                        chunks.append(decoded)
                        gens.append(g)
                        ages.append(inserted - 1 - int(view.first_step[slot]))
                if chunks:
                    rows = _transitions(chunks, gens, ages, position[which], starts, values / total,
                                        batch_size - got, n_step, gamma, stack, cfg.chunk_length)
                    parts.append(rows)
                    got += rows.keys.size
            if got == batch_size:
                break
        else:
            raise MemoryNotReady(f"could not draw {batch_size} valid transitions: the Redis memory holds too few "
                                 "that can start one yet (fill it more before learning)")
        self._sampled_unreported += batch_size  # reported with the next refresh (one round trip fewer per batch)
        rows = parts[0] if len(parts) == 1 else _Rows.join(parts)
        return TransitionBatch(
            obs=rows.obs,
            actions=rows.actions,
            returns=rows.returns,
            discounts=rows.discounts,
            next_obs=rows.next_obs,
            weights=importance_weights(rows.probs, beta, self._view.population if self._view else 1,
                                       cfg.prioritized),
            keys=rows.keys,
            agent_ids=rows.agent_ids,
            ages=rows.ages,
        )

    def _sequence_view(self, force: bool) -> _SequenceView:
        view = self._seq_view
        if view is not None and not force and time.monotonic() - view.fetched < self._refresh_s:
            return view
        pipe = self._r.pipeline(transaction=True)  # one moment, as in ``_refresh``
        for key in ("gseq", "seqprio", "maxprio", "steps"):
            pipe.get(self._k[key])
        pipe.hget(self._k["stats"], "inserted")
        self._report_sampled(pipe)
        gseq_b, prio_b, maxprio_b, steps_b, inserted_b = pipe.execute()[:5]
        if gseq_b is None or prio_b is None or steps_b is None:
            raise MemoryNotReady("the Redis memory's layout is gone (a restart without persistence?): its next "
                                 "write recreates it")
        slots = self._cfg.slots
        gseq = np.frombuffer(gseq_b, dtype="<i8").astype(np.int64)
        leaves = np.where(gseq >= 0, np.frombuffer(prio_b, dtype="<f4").astype(np.float64), 0.0)
        if not self._cfg.prioritized:
            leaves = (leaves > 0).astype(np.float64)
        tree = SumTree(np.zeros(tree_buffer_size(slots)), slots)
        tree.set_range(0, leaves)
        self._max_priority = max(self._max_priority, float(maxprio_b or 1.0))
        steps = np.frombuffer(steps_b, dtype="<u2").astype(np.int64)
        self._seq_view = _SequenceView(gseq=gseq, tree=tree, population=int(np.count_nonzero(leaves)),
                                       first_step=_first_steps(gseq, steps, int(inserted_b or 0)))
        return self._seq_view

    def sample_sequences(self, batch_size: int, length: int, stack: int, beta: float) -> SequenceBatch:
        """Sequences of ``length`` steps from the first steps of stored chunks that carry a recurrent state, as
        the embedded memory returns them: steps after the episode's last step, or beyond what the stream had
        written when the chunk was stored, are padding (mask False, zero frames, actions, rewards and flags).

        A sequence has one priority (its key: the chunk's g with ``SEQUENCE_KEY`` set); one read per sequence.
        """
        cfg = self._cfg
        if cfg.recurrent_hidden is None:
            raise RuntimeError("this memory was created without recurrent_hidden: it stores no sequences")
        if batch_size < 1 or length < 1 or stack < 1 or beta < 0.0:
            raise ValueError(f"need batch_size, length, stack >= 1 and beta >= 0; got {batch_size}, {length}, {stack}")
        if length > cfg.sequence_length or stack - 1 > cfg.context:
            raise ValueError(f"this memory keeps sequences of up to {cfg.sequence_length} steps with stack <= "
                             f"{cfg.context + 1}; got {length} and {stack}")
        rows: list[dict[str, Any]] = []
        for round_ in range(_MAX_ROUNDS):
            view = self._sequence_view(force=round_ > 0)
            total = view.tree.total()
            if total > 0:
                k = (batch_size - len(rows)) * (1 + round_) + 2
                slots, values = view.tree.find(self._rng.random(k) * total)
                valid = values > 0
                slots, values = slots[valid], values[valid]
                fetched, inserted = self._fetch(np.unique(slots))
                for slot, value in zip(slots.tolist(), values.tolist(), strict=True):
                    g, decoded = fetched[slot]
                    if decoded is None or g != view.gseq[slot]:
                        continue  # rewritten since the view was taken, or undecodable
                    row = _sequence(decoded, length, stack)
                    if row is None:
                        continue
                    row["key"] = g | SEQUENCE_KEY
                    row["prob"] = value / total
                    row["age"] = inserted - 1 - int(view.first_step[slot])  # the sequence starts at own step 0
                    rows.append(row)
                    if len(rows) == batch_size:
                        break
            if len(rows) == batch_size:
                break
        else:
            raise MemoryNotReady(f"could not draw {batch_size} valid sequences: the Redis memory holds too few yet "
                                 "(fill it more before learning)")
        self._sampled_unreported += batch_size
        probs = np.array([r["prob"] for r in rows])

        def stacked(name: str) -> np.ndarray:
            return np.stack([r[name] for r in rows])

        return SequenceBatch(
            frames=stacked("frames"), actions=stacked("actions"), rewards=stacked("rewards"), first=stacked("first"),
            last=stacked("last"), terminated=stacked("terminated"), mask=stacked("mask"),
            recurrent_state=stacked("state"),
            weights=importance_weights(probs, beta, self._seq_view.population if self._seq_view else 1,
                                       cfg.prioritized),
            keys=np.array([r["key"] for r in rows], dtype=np.int64),
            agent_ids=np.array([r["agent"] for r in rows], dtype=np.int32),
            ages=np.array([r["age"] for r in rows], dtype=np.int64),
        )  # fmt: skip

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
        is_seq = (keys & SEQUENCE_KEY) != 0  # a sequence's key: its chunk's g (one sequence per chunk)
        if cfg.recurrent_hidden is None:
            finite &= ~is_seq
        raw = np.abs(np.where(finite, values, 0.0)) + cfg.priority_eps
        leaves = (raw**cfg.alpha).astype("<f4")
        g = np.where(is_seq, keys & ~SEQUENCE_KEY, keys // cfg.chunk_length)
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
                if is_seq[i]:
                    pipe.setrange(self._k["seqprio"], slot * 4, leaves[i : i + 1].tobytes())
                    continue
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
        if gseq_b is None or steps_b is None or agent_b is None:
            gseq_b = steps_b = agent_b = b""  # the layout is gone (restart without persistence): empty
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


# KEYS: gseq, chunk-key prefix, stats. ARGV: slots (int32 each), the g the caller holds a decoded copy of for each
# (int64 each; any other value where it holds none). Returns the slots' current g (int64 each, -1 where empty), the
# steps inserted so far (sample ages count from it) and then, in slot order, the chunk of each slot whose g differs
# from the caller's (false where none is stored). A script runs atomically: a chunk and its g are always read
# together.
_FETCH = """
local n = #ARGV[1] / 4
local gs = {}
local out = {false, redis.call('HGET', KEYS[3], 'inserted')}
for i = 1, n do
  local slot = struct.unpack('<i4', ARGV[1], 4 * i - 3)
  local g = redis.call('GETRANGE', KEYS[1], slot * 8, slot * 8 + 7)
  if #g ~= 8 then g = string.rep('\\255', 8) end
  gs[i] = g
  if g ~= string.sub(ARGV[2], 8 * i - 7, 8 * i) then
    out[#out + 1] = redis.call('GET', KEYS[2] .. slot)
  end
end
out[1] = table.concat(gs)
return out
"""
_NOT_HELD = np.iinfo(np.int64).min  # never a slot's g

# Per-step flags of a prepared chunk.
_FIRST, _LAST, _TERMINATED, _ABSENT = 1, 2, 4, 8


@dataclass
class _Prepared(DecodedChunk):
    """A decoded chunk with its per-step arrays laid out for the vectorised sampler (built once per decode).

    ``flags`` (``_FIRST | _LAST | _TERMINATED``), ``rewards`` and ``actions`` hold the stored steps after ``pad``
    absent steps (``_ABSENT``), and are followed by absent steps too, so that every window a transition reads (up
    to ``context`` steps before its start and ``lookahead`` after) stays inside the chunk's own arrays.
    (Three plain arrays: numpy joins and gathers them several times faster than one structured array.)
    """

    flags: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    rewards: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    actions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pad: int = 0
    own: int = 0  # steps that may start a transition: not borrowed as context or lookahead
    meta: tuple[int, int, int, int] = (0, 0, 0, 0)  # own, context_steps, flags.size, agent_id

    @classmethod
    def of(cls, decoded: DecodedChunk, before: int, after: int) -> _Prepared:
        c = decoded.chunk
        t = len(c)
        size = before + t + after
        flags = np.full(size, _ABSENT, dtype=np.uint8)
        flags[before : before + t] = (c.first * _FIRST) | (c.last * _LAST) | (c.terminated * _TERMINATED)
        rewards = np.zeros(size, dtype=np.float32)
        rewards[before : before + t] = c.rewards
        actions = np.zeros(size, dtype=np.int64)
        actions[before : before + t] = c.actions
        own = t - decoded.context_steps - decoded.lookahead_steps
        return cls(**vars(decoded), flags=flags, rewards=rewards, actions=actions, pad=before, own=own,
                   meta=(own, decoded.context_steps, size, int(c.agent_id)))


@dataclass
class _Rows:
    """Transitions drawn in one round of ``sample``."""

    obs: np.ndarray
    next_obs: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    discounts: np.ndarray
    keys: np.ndarray
    agent_ids: np.ndarray
    ages: np.ndarray
    probs: np.ndarray

    @classmethod
    def join(cls, parts: list[_Rows]) -> _Rows:
        names = ("obs", "next_obs", "actions", "returns", "discounts", "keys", "agent_ids", "ages", "probs")
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in names})


_DISCOUNTING: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = {}


def _discounting(gamma: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """gamma ** k for k < n (float32, as ``_transition`` sums a return) and the discount gamma ** m for m <= n."""
    cached = _DISCOUNTING.get((gamma, n))
    if cached is not None:
        return cached
    powers = np.power(np.float32(gamma), np.arange(n), dtype=np.float32)
    discounts = np.array([float(np.float32(gamma) ** np.float32(m)) for m in range(n + 1)], dtype=np.float32)
    powers.flags.writeable = discounts.flags.writeable = False
    if len(_DISCOUNTING) < 64:
        _DISCOUNTING[(gamma, n)] = (powers, discounts)
    return powers, discounts


def _transitions(chunks: list[_Prepared], gens: list[int], ages: list[int], position: np.ndarray,
                 starts: np.ndarray, probs: np.ndarray, need: int, n: int, gamma: float, stack: int,
                 chunk_length: int) -> _Rows:
    """The first ``need`` draws that start an n-step transition, in draw order, vectorised over the draws.

    Draw i is own step ``starts[i]`` of ``chunks[position[i]]`` (which holds chunk g ``gens[position[i]]``, whose
    first own step has sample age ``ages[position[i]]``; ``position`` -1: the draw cannot be used). The embedded
    memory's rules, one numpy operation per rule: no start at an episode's last step or where the steps it needs
    are not stored; the n-step return stops at the episode's last step (discount 0 if it terminated, else
    gamma ** m); a stack repeats the episode's first frame before it, and a stack that needs steps from before what
    the chunk stores cannot be used.
    """
    a = stack - 1  # the start's column in a draw's window of steps s - a .. s + n
    k = position.size
    usable = position >= 0
    pos = np.where(usable, position, 0)
    meta = np.array([c.meta for c in chunks])  # own, context, size, agent
    sizes = meta[:, 2]
    usable &= starts < meta[pos, 0]
    s = meta[pos, 1] + np.where(usable, starts, 0)  # the start within its stored chunk
    at = (np.cumsum(sizes) - sizes)[pos] + chunks[0].pad + s  # ... within the chunks' joined arrays
    window = np.concatenate([c.flags for c in chunks])[at[:, None] + np.arange(-a, n + 1)]
    usable &= (window[:, a] & _LAST) == 0  # an episode's last step starts nothing
    # m: steps until the episode's last step, at most n; every step up to it must be stored and of this episode.
    m = np.zeros(k, dtype=np.int64)
    open_ = usable.copy()
    for step in range(1, n + 1):
        broken = open_ & ((window[:, a + step] & (_ABSENT | _FIRST)) != 0)
        usable &= ~broken
        open_ &= ~broken
        m[open_] = step
        open_ &= (window[:, a + step] & _LAST) == 0
    # The frame stacks of obs (rows 0..k-1, ending at s) and next_obs (rows k.., ending at s + m): before the
    # episode's first step that step repeats; without a first step in the stack, every step must be stored.
    columns = np.arange(stack)
    ends = np.concatenate([np.zeros(k, dtype=np.int64), m])
    stacks = window[np.concatenate([np.arange(k), np.arange(k)])[:, None], ends[:, None] + columns]
    latest = np.where((stacks & _FIRST) != 0, columns, -1).max(axis=1)
    complete = (latest >= 0) | ((stacks & _ABSENT) == 0).all(axis=1)
    usable &= complete[:k] & complete[k:]
    chosen = np.flatnonzero(usable)[:need]

    pos, at, m = pos[chosen], at[chosen], m[chosen]
    powers, discount_of = _discounting(gamma, n)
    rewards = np.concatenate([c.rewards for c in chunks])[at[:, None] + np.arange(n)]
    # float32 products summed in float64, as ``np.dot`` does for float32 vectors (OpenBLAS' sdot).
    total = np.zeros(chosen.size, dtype=np.float64)
    for step in range(n):
        total += np.where(step < m, rewards[:, step] * powers[step], np.float32(0))
    terminal = (window[chosen, a + m] & _TERMINATED) != 0
    # Frame indices within each stored chunk: obs rows first, then next_obs rows.
    steps = (np.concatenate([s[chosen], s[chosen] + m]) - a)[:, None] + np.maximum(
        columns, np.concatenate([latest[chosen], latest[k + chosen]])[:, None])
    frames = chunks[0].chunk.frames
    obs, next_obs = _output((2, chosen.size, stack, *frames.shape[1:]), frames.dtype)
    b = chosen.size
    for r, p in enumerate(pos.tolist()):  # indices are in range: "clip" only spares take() a buffered copy
        frames = chunks[p].chunk.frames
        frames.take(steps[r], axis=0, out=obs[r], mode="clip")
        frames.take(steps[b + r], axis=0, out=next_obs[r], mode="clip")
    return _Rows(
        obs=obs, next_obs=next_obs, actions=np.concatenate([c.actions for c in chunks])[at],
        returns=total.astype(np.float32), discounts=np.where(terminal, np.float32(0), discount_of[m]),
        keys=np.array(gens, dtype=np.int64)[pos] * chunk_length + starts[chosen],
        agent_ids=meta[pos, 3].astype(np.int32),
        ages=np.array(ages, dtype=np.int64)[pos] - starts[chosen],  # a chunk's own steps were inserted in order
        probs=probs[chosen])


# Memory of batches that nothing refers to any more, by size, ready for the next batch (see ``_Recycled``).
_FREE_OUTPUTS: dict[int, list[np.ndarray]] = {}
_FREE_PER_SIZE = 4


class _Recycled:
    """The owner of one batch's obs and next_obs memory.

    Every array made from it keeps it alive (numpy keeps a view's base alive), so its ``__del__`` runs when the
    last of them is gone, and then puts the memory back for a later batch. A batch is 2 x 0.9 MB for Atari:
    freshly allocated, each of its pages would be mapped and zeroed on first touch, which costs more than
    filling it (glibc gives blocks that large back to the kernel when they are freed).
    """

    __slots__ = ("__array_interface__", "_memory")

    def __init__(self, memory: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._memory = memory
        self.__array_interface__ = {"shape": shape, "typestr": dtype.str, "data": (memory.ctypes.data, False),
                                    "version": 3}

    def __del__(self) -> None:
        try:
            free = _FREE_OUTPUTS.setdefault(self._memory.nbytes, [])
        except (AttributeError, TypeError):  # interpreter shutdown: the module's globals are gone
            return
        if len(free) < _FREE_PER_SIZE:
            free.append(self._memory)


def _output(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array (recycled memory where some is free)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    try:
        memory = _FREE_OUTPUTS[nbytes].pop()  # atomic: samplers on several threads may share the free lists
    except (KeyError, IndexError):
        memory = np.empty(nbytes, dtype=np.uint8)
    return np.asarray(_Recycled(memory, shape, dtype))


def _sequence(decoded: DecodedChunk, length: int, stack: int) -> dict[str, Any] | None:
    """The sequence of ``length`` steps from own step 0 of a stored chunk, or None if the chunk starts none.

    Same rules as the embedded memory: the mask runs from the start until the episode's last step, a step that
    is not stored (the stream had not gone on when the chunk was written) or one that starts an episode; masked
    steps are zeros. With ``stack`` > 1, each step's frames are its stack: before the episode's first step that
    step repeats; a stack that needs steps from before what the chunk stores (or across an episode's last step
    without a first after it) starts no sequence.
    """
    c = decoded.chunk
    if c.recurrent_state is None:
        return None
    s, n, back = decoded.context_steps, len(c), stack - 1
    idx = s + np.arange(length)
    clipped = np.minimum(idx, n - 1)
    real = (idx < n) & ~c.first[clipped]
    real[1:] &= ~c.last[clipped[:-1]]
    real[0] = True
    mask = np.logical_and.accumulate(real)
    pos = np.where(mask, idx, s + int(mask.sum()) - 1)
    window = np.empty(back + length, dtype=np.int64)
    window[back:] = pos
    episode_first = -1
    for j in range(1, back + 1):
        p = s - j
        if episode_first < 0 and c.first[p + 1]:
            episode_first = p + 1
        if episode_first >= 0:
            window[back - j] = episode_first
        elif p < 0 or c.last[p]:
            return None
        else:
            window[back - j] = p
    steps = pos if stack == 1 else np.lib.stride_tricks.sliding_window_view(window, stack)
    frames = c.frames[steps]  # a copy (fancy indexing)
    frames[~mask] = 0
    return {
        "frames": frames,
        "actions": np.where(mask, c.actions[pos], 0).astype(np.int64),
        "rewards": np.where(mask, c.rewards[pos], 0.0).astype(np.float32),
        "first": c.first[pos] & mask,
        "last": c.last[pos] & mask,
        "terminated": c.terminated[pos] & mask,
        "mask": mask,
        "state": np.asarray(c.recurrent_state, dtype=np.float32),
        "agent": c.agent_id,
    }


def _safe_address(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"

