"""The hive's model store in its memory's Redis: each agent's latest checkpoint, and the hive's best agent.

An agent's pod may go at any time (a roll, a reschedule, a node lost, ``kubectl scale`` down); whatever pod takes
over agent k resumes from k's checkpoint here (``borgdqn.hive``). The memory's Redis already has what a store
needs: a password, the append-only file on a persistent volume, and a place every agent reaches.

A put is one script: the checkpoint's bytes, its entry and, when its agent's best mean beats the hive's, the best
pointer change together or not at all, so a reader never sees a checkpoint without its entry. The store is
bounded: a checkpoint larger than ``MAX_MODEL_BYTES``, or one that would take the store past its budget
(``replay.model_store_bytes``, which the memory's ``maxmemory`` includes), is refused with StoreFull and written
nowhere. Checkpoints are stored as bytes and read back as untrusted input (``borgdqn.rl.checkpoint`` loads them
without unpickling objects).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from borgdqn.memory.redis.keys import StoreKeys

MAX_MODEL_BYTES = 256 << 20  # a Nature-CNN agent's checkpoint is ~27 MB (online, target, Adam's two moments)

# KEYS: models, best, model:<k>. ARGV: agent, checkpoint bytes, entry JSON, best mean ("" when none), budget.
# Returns the store's bytes after the put, or the error BORG_STORE_FULL <bytes it would hold>.
_PUT = """
local total, old = 0, 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local ok, entry = pcall(cjson.decode, entries[i + 1])
  local size = (ok and type(entry) == 'table' and tonumber(entry['size_bytes'])) or 0
  if entries[i] == ARGV[1] then old = size end
  total = total + size
end
local after = total - old + #ARGV[2]
if after > tonumber(ARGV[5]) then return redis.error_reply('BORG_STORE_FULL ' .. after) end
redis.call('SET', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[4] ~= '' then
  local mean = tonumber(ARGV[4])
  local raw = redis.call('GET', KEYS[2])
  local ok, best = pcall(cjson.decode, raw or '')
  local current = ok and type(best) == 'table' and tonumber(best['best_mean']) or nil
  if current == nil or mean > current or tostring(best['agent']) == ARGV[1] then
    redis.call('SET', KEYS[2], cjson.encode({agent = tonumber(ARGV[1]), best_mean = mean}))
  end
end
return after
"""


class StoreFull(RuntimeError):
    """A checkpoint the store's bound refuses (too large, or past the store's budget)."""


@dataclass(frozen=True)
class ModelEntry:
    """What the store says about agent ``agent``'s checkpoint."""

    agent: int
    env_steps: int
    best_mean: float | None  # best mean return over 20 episodes so far (None before 20 episodes)
    size_bytes: int
    saved_unix: float
    mean_return: float | None = None  # mean return of its last 20 episodes when saved (what assimilation ranks)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelEntry | None:
        """The entry, or None for anything else (a hostile or older value is skipped, never trusted)."""
        try:
            data: Any = json.loads(raw)
            best, mean = data.get("best_mean"), data.get("mean_return")
            entry = cls(agent=int(data["agent"]), env_steps=int(data["env_steps"]),
                        best_mean=None if best is None else float(best), size_bytes=int(data["size_bytes"]),
                        saved_unix=float(data["saved_unix"]), mean_return=None if mean is None else float(mean))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        finite = all(v is None or math.isfinite(v) for v in (entry.best_mean, entry.mean_return))
        return entry if entry.agent >= 0 and entry.env_steps >= 0 and entry.size_bytes >= 0 and finite else None


class RedisModelStore:
    """The model store of hive ``name`` in the Redis behind ``client`` (redis-py, bytes replies)."""

    def __init__(self, client: Any, name: str, budget_bytes: int) -> None:
        if budget_bytes < 1:
            raise ValueError(f"a model store needs a budget of at least one byte, not {budget_bytes}")
        self._r = client
        self.keys = StoreKeys.of(name)
        self.budget_bytes = int(budget_bytes)
        self._put = client.register_script(_PUT)

    def put(self, entry: ModelEntry, checkpoint: bytes) -> int:
        """Store agent ``entry.agent``'s checkpoint (replacing its previous one); returns the store's bytes.
        StoreFull when the bound refuses it (nothing is written); Redis errors propagate."""
        if len(checkpoint) > MAX_MODEL_BYTES:
            raise StoreFull(f"a checkpoint of {len(checkpoint) / 2**20:.0f} MiB is larger than the store takes "
                            f"({MAX_MODEL_BYTES >> 20} MiB)")
        entry = dataclasses.replace(entry, size_bytes=len(checkpoint))
        best = "" if entry.best_mean is None or not math.isfinite(entry.best_mean) else repr(entry.best_mean)
        try:
            total = self._put(keys=[self.keys.models, self.keys.best, self.keys.model(entry.agent)],
                              args=[entry.agent, checkpoint, entry.to_json(), best, self.budget_bytes])
        except Exception as err:
            if "BORG_STORE_FULL" in str(err):
                would = str(err).rsplit(" ", 1)[-1]
                raise StoreFull(f"the model store would hold {would} bytes, past its budget of "
                                f"{self.budget_bytes} (replay.model_store_bytes)") from None
            raise
        return int(total)

    def get(self, agent: int) -> bytes | None:
        """Agent ``agent``'s latest checkpoint, or None when the store has none."""
        data = self._r.get(self.keys.model(agent))
        return None if data is None else bytes(data)

    def entries(self) -> dict[int, ModelEntry]:
        """Every agent's entry that reads as one (hostile values are skipped)."""
        found = {}
        for raw in self._r.hvals(self.keys.models):
            entry = ModelEntry.from_json(raw)
            if entry is not None:
                found[entry.agent] = entry
        return found

    def mark_finished(self, agent: int, env_steps: int) -> None:
        """Say that agent ``agent`` finished its budget at ``env_steps`` (read by the operator: ``read_finished``)."""
        self._r.hset(self.keys.finished, str(agent), str(int(env_steps)))

    def close(self) -> None:
        self._r.close()

    def best(self) -> tuple[int, float] | None:
        """(agent, best mean return over 20 episodes) of the hive's best agent so far, or None."""
        try:
            data: Any = json.loads(self._r.get(self.keys.best) or b"null")
            agent, mean = int(data["agent"]), float(data["best_mean"])
        except (ValueError, TypeError, KeyError):
            return None
        return (agent, mean) if agent >= 0 and math.isfinite(mean) else None


def read_finished(client: Any, name: str) -> dict[int, int]:
    """Agent id -> env steps at which it finished its budget, for hive ``name`` (values that are not two
    non-negative integers are skipped)."""
    found = {}
    for agent, steps in client.hgetall(StoreKeys.of(name).finished).items():
        try:
            k, n = int(agent), int(steps)
        except (TypeError, ValueError):
            continue
        if k >= 0 and n >= 0:
            found[k] = n
    return found
