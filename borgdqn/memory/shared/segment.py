"""The memory block itself: its handle for other processes, its array views, its lock, and its POSIX name.

A memory lives in one POSIX shared-memory segment (or, private to one process, in anonymous memory) laid out by
``layout.py``. The lock is held only for bookkeeping (tens of microseconds, never for a copy); a lock not released
within a minute means its holder died, and raises instead of hanging the hive.
"""

from __future__ import annotations

import _posixshmem
import _thread
import os
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.synchronize import Lock as ProcessLock

import numpy as np

from borgdqn.memory.shared.layout import SegmentParams
from borgdqn.memory.sumtree import SumTree

MAX_CLIENTS = 1024  # attached instances with a `sampled` counter of their own; later ones share the last
LOCK_TIMEOUT_S = 60.0  # held this long, the lock's holder died holding it: fail loudly instead of hanging

ThreadLock = _thread.LockType  # a private memory's lock: its threads share it, no other process does


@dataclass(frozen=True)
class SharedReplayHandle:
    """What a child process needs to attach: the segment's name, its layout parameters and the lock."""

    name: str
    params: SegmentParams
    lock: ProcessLock


class HeldLock:
    """``with`` for the shared lock, with a timeout: a process killed inside it would otherwise hang the hive."""

    def __init__(self, lock: ProcessLock | ThreadLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise RuntimeError(
                f"replay memory lock not free after {LOCK_TIMEOUT_S:.0f}s: a process died while holding it; "
                "restart the hive"
            )

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class Arrays:
    """Numpy views of the segment; dropped as a whole on close so that the mapping can be released."""

    def __init__(self, views: dict[str, np.ndarray], p: SegmentParams) -> None:
        self.header = views["header"]
        self.headerf = views["headerf"]
        self.sampled = views["sampled"]
        self.agent_counts = views["agent_counts"]
        self.stream_keys = views["stream_keys"]
        self.stream_last = views["stream_last"]
        self.seq = views["seq"]
        self.prev = views["prev"]
        self.next = views["next"]
        self.actions = views["actions"]
        self.agents = views["agents"]
        self.rewards = views["rewards"]
        self.flags = views["flags"]
        self.frames = views["frames"]
        empty = np.zeros(0, dtype=np.int64)
        self.side_id = views.get("side_id", empty)
        self.side_seq = views.get("side_seq", empty)
        self.side_state = views.get("side_state", np.zeros((0, 2, 0), dtype=np.float32))
        self.tree = SumTree(views["tree"], p.capacity) if "tree" in views else None
        self.side_tree = SumTree(views["side_tree"], p.max_sequences) if "side_tree" in views else None


def default_sequences(capacity: int) -> int:
    """Sequence starts a memory keeps unless told: enough for chunks of 16 steps or more."""
    return max(16, -(-capacity // 16))


def segment_name(name: str) -> str:
    return name if name.startswith("/") else "/" + name


SHM_DIR = "/dev/shm"


class NoRoom(ValueError):
    """The shared-memory file system cannot hold the memory (its pages would fault with SIGBUS when first written)."""


def check_room(nbytes: int, where: str = SHM_DIR) -> None:
    """NoRoom (one line) unless ``where`` has ``nbytes`` free: ftruncate succeeds on a too small tmpfs, and the
    process dies with SIGBUS, no message, at its first write past the free space."""
    try:
        stats = os.statvfs(where)
    except OSError:
        return  # no such file system here (not Linux): shm_open reports what it reports
    free = stats.f_bavail * stats.f_frsize
    if nbytes > free:
        raise NoRoom(f"the replay memory needs {nbytes / 1e9:.2f} GB of shared memory and {where} has "
                     f"{free / 1e9:.2f} GB free")


def unlink_segment(name: str, owner_pid: int | None = None) -> None:
    if owner_pid is not None and os.getpid() != owner_pid:
        return  # a forked copy of the owner exiting must not free the hive's memory
    try:
        _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        return
    resource_tracker.unregister(name, "shared_memory")


def ring_runs(start: int, count: int, capacity: int) -> list[tuple[int, int, int]]:
    """(slot, offset in chunk, length) runs of ``count`` slots from ``start``; two runs when the ring wraps."""
    if start + count <= capacity:
        return [(start, 0, count)]
    first = capacity - start
    return [(start, 0, first), (0, first, count - first)]
