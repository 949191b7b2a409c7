"""A wide sum tree over a flat float64 buffer, for proportional prioritized sampling with vectorised numpy.

The tree lives in a caller-provided buffer (the replay's shared memory), so every process sees the same
priorities. Each node has ``FANOUT`` children instead of two: a binary tree over 250k leaves is 18 levels deep
and numpy pays its per-call overhead on every level, while a 64-ary tree has 3 levels and each is one gather of
``[B, 64]`` values. ``find`` does not even descend from the root: it binary-searches one flat prefix sum of the
lowest small level (3907 nodes for 250k leaves) and descends only below it. Parents are always recomputed as the
sum of their children (never updated by adding a delta), so rounding cannot drift and a racing reader only ever
sees slightly stale sums.

Writers must serialise ``set``/``set_range``/``rebuild`` (the replay holds its lock); ``find`` may run
concurrently with a writer: a torn read makes it return a slightly wrong leaf, which the caller validates.
"""

from __future__ import annotations

import numpy as np

FANOUT = 64
_SEARCH_LEVEL_MAX = 8192  # largest level that find() searches with one flat prefix sum


def _level_sizes(n: int) -> list[int]:
    """Lengths of the levels, leaves first; each is a multiple of FANOUT and the last one is exactly FANOUT."""
    if n < 1:
        raise ValueError(f"a sum tree needs at least one leaf, got {n}")
    sizes = []
    length = n
    while True:
        padded = -(-length // FANOUT) * FANOUT
        sizes.append(padded)
        if padded == FANOUT:
            return sizes
        length = padded // FANOUT


def tree_buffer_size(n: int) -> int:
    """Number of float64 values a tree over ``n`` leaves needs."""
    return sum(_level_sizes(n))


class SumTree:
    """Sums over ``n`` non-negative leaves; ``find`` maps prefix-sum targets to leaves (B at once)."""

    def __init__(self, buffer: np.ndarray, n: int) -> None:
        sizes = _level_sizes(n)
        if buffer.dtype != np.float64 or buffer.shape != (sum(sizes),):
            raise ValueError(f"buffer must be float64 of shape ({sum(sizes)},), got {buffer.dtype} {buffer.shape}")
        self.n = n
        self._levels: list[np.ndarray] = []
        offset = 0
        for size in sizes:
            self._levels.append(buffer[offset : offset + size])
            offset += size
        # Blocked views of each level: row i holds the children of node i of the level above.
        self._blocks = [level.reshape(-1, FANOUT) for level in self._levels]
        # Largest node index worth descending into at each level (below it: padding, or leaves >= n).
        self._last_node = [n - 1] + [block.shape[0] - 1 for block in self._blocks[:-1]]
        small = [d for d in range(1, len(self._levels)) if self._levels[d].shape[0] <= _SEARCH_LEVEL_MAX]
        self._search_level = min(small, default=len(self._levels) - 1)

    @property
    def leaves(self) -> np.ndarray:
        return self._levels[0][: self.n]

    def total(self) -> float:
        return float(self._levels[-1].sum())

    def set(self, index: np.ndarray, values: np.ndarray | float) -> None:
        """Set leaves ``index`` (any order, duplicates: last wins) and refresh their ancestors."""
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return
        self._levels[0][index] = values
        node = index // FANOUT
        for depth in range(1, len(self._levels)):
            # Duplicate parents are recomputed twice with the same value: cheaper than np.unique.
            self._levels[depth][node] = self._blocks[depth - 1][node].sum(axis=1)
            node //= FANOUT

    def set_range(self, start: int, values: np.ndarray | float, count: int | None = None) -> None:
        """Set the contiguous leaves ``start .. start+count-1``; contiguous parents are refreshed by slices."""
        if count is None:
            count = values.size if isinstance(values, np.ndarray) else int(np.size(values))
        if count == 0:
            return
        stop = start + count
        if start < 0 or stop > self.n:
            raise IndexError(f"leaf range {start}..{stop} outside 0..{self.n}")
        self._levels[0][start:stop] = values
        lo, hi = start // FANOUT, (stop - 1) // FANOUT + 1
        for depth in range(1, len(self._levels)):
            self._levels[depth][lo:hi] = self._blocks[depth - 1][lo:hi].sum(axis=1)
            lo, hi = lo // FANOUT, (hi - 1) // FANOUT + 1

    def rebuild(self) -> None:
        """Recompute every inner node from the leaves (after leaves were written directly)."""
        for depth in range(1, len(self._levels)):
            rows = self._blocks[depth - 1].shape[0]
            self._levels[depth][:rows] = self._blocks[depth - 1].sum(axis=1)
            self._levels[depth][rows:] = 0.0

    def find(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Leaf index and leaf value for each prefix-sum target in ``[0, total)``.

        Leaf i is found for targets in ``[sum(leaves[:i]), sum(leaves[:i+1]))``, so zero leaves are never
        chosen except when rounding pushes a target past the end; callers treat a returned value of 0 as a miss.
        """
        u = np.array(targets, dtype=np.float64, copy=True)
        # Start at the lowest inner level that is small: one 1-D prefix sum over it and a binary search serve
        # all targets at once, which is cheaper in numpy than descending the levels above it one by one.
        # (ndarray methods and in-place ops throughout: this runs once per batch, where numpy's per-call
        # overhead, not the arithmetic, is the cost.)
        start = self._search_level
        level = self._levels[start]
        prefix_level = level.cumsum()
        node = np.minimum(prefix_level.searchsorted(u, side="right"), self._last_node[start])
        u -= prefix_level[node] - level[node]
        flat = np.arange(0, u.size * FANOUT, FANOUT)
        for depth in range(start - 1, -1, -1):
            children = self._blocks[depth][node]
            prefix = children.cumsum(axis=1)
            # First child whose prefix sum exceeds the target; none (rounding, a racing writer): the last one.
            above = prefix > u[:, None]
            child = above.argmax(axis=1)
            if np.count_nonzero(above[:, -1]) < child.shape[0]:
                child[~above[:, -1]] = FANOUT - 1
            at = flat + child
            u -= prefix.ravel()[at] - children.ravel()[at]
            # Rounding (or a racing writer) can push a target past the last real node into the padding.
            node *= FANOUT
            node += child
            np.minimum(node, self._last_node[depth], out=node)
        return node, self._levels[0][node]
