"""The sampling rules, in one place: per-step flag bits, sampled keys, the window rule (frame stacks that repeat an
episode's first frame, n-step windows that stop at its last step, no window across a gap), discount tables,
argument checks and importance weights. The embedded memory (and so every agent's replica of the Redis log)
applies them.
"""

from __future__ import annotations

import functools

import numpy as np

# Bits of the per-step flags byte.
FIRST = 1
LAST = 2
TERMINATED = 4

# Keys of sampled sequences carry this bit, so one update_priorities serves transitions and sequences.
SEQUENCE_KEY = 1 << 62


def check_batch_args(batch_size: int, beta: float) -> None:
    if batch_size < 1 or beta < 0.0:
        raise ValueError(f"need batch_size >= 1 and beta >= 0; got {batch_size}, {beta}")


def importance_weights(probs: np.ndarray, beta: float, population: int, prioritized: bool) -> np.ndarray:
    """(N * P(i)) ** -beta, max-normalised over the batch; ones when sampling is uniform or beta is 0."""
    if not prioritized or beta == 0.0:
        return np.ones(probs.shape[0], dtype=np.float32)
    w = probs * max(population, 1)
    w **= -beta
    w /= w.max()
    return w.astype(np.float32)


@functools.lru_cache(maxsize=64)
def gamma_tables(gamma: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Constant for a learner's whole run (read-only, shared): ``gamma ** 0 .. gamma ** n`` in float32, and
    the discount of a transition of m steps whose final step has flags f, ``[m, f]``: 0 if terminated, else
    ``gamma ** m`` (one lookup per batch instead of a mask and a select)."""
    powers = np.power(np.float32(gamma), np.arange(n + 1), dtype=np.float32)
    terminated = (np.arange(256) & TERMINATED) != 0
    discount_of = np.where(terminated[None, :], np.float32(0.0), powers[:, None])
    for table in (powers, discount_of):
        table.flags.writeable = False
    return powers, discount_of


@functools.lru_cache(maxsize=64)
def boundary_bits(back: int, ahead: int) -> np.ndarray:
    """Per window column ``[back + 1 + ahead, 1]``: the flags that make it an episode boundary of a transition."""
    bits = np.zeros((back + 1 + ahead, 1), dtype=np.uint8)
    bits[1:] |= FIRST  # an episode starts after the window's first column: its stack is padded
    bits[: max(back + ahead, back + 1)] |= LAST  # one ends before the final column (or at the start): n-step cut
    bits.flags.writeable = False
    return bits


@functools.lru_cache(maxsize=64)
def all_true(k: int, ahead: int) -> np.ndarray:
    """A read-only ``alive`` mask of ``k`` windows whose ``ahead`` steps all lie in the episode."""
    out = np.ones((k, ahead), dtype=bool)
    out.flags.writeable = False
    return out


def window(
    prev: np.ndarray, next_: np.ndarray, seq: np.ndarray, flags_of: np.ndarray, starts: np.ndarray, back: int,
    ahead: int, strict: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seqs of the steps around each start, with the episode's boundaries applied: the frame-stack, n-step and
    episode-cut rule of every memory, in one place.

    The memory's per-slot arrays: ``prev`` / ``next`` hold the seq of the neighbouring step of the same stream
    (-1: none), ``seq`` the seq each slot holds now, ``flags_of`` its ``FIRST | LAST | TERMINATED`` bits; all are
    indexed by seq modulo their length.

    Column ``back`` holds the start, columns before it its stack (the episode's first step repeated before
    the episode began), the ``ahead`` columns after it the following steps up to the episode's last step
    (later columns repeat the final step). Returns (pos, alive [k, ahead]: the column after the start holds
    a real step, flags of the final real step, ok [k]). ``strict`` (transitions): a window missing a step
    (evicted, not written yet, inconsistent) or starting at a last step is not ok; otherwise (sequences)
    a missing step only ends ``alive`` early. Starts may be any int64 (draws that failed the caller's own
    checks are validated along with the others and filtered by the caller: one filter instead of two).
    """
    k = starts.shape[0]
    w = back + 1 + ahead
    # Chase the links first and validate all at once afterwards: numpy costs per call, not per row. A
    # dead link leads to garbage, which is harmless: every position is checked against its slot's seq.
    # The work is done on the transpose, one contiguous row per column of the window, with ndarray
    # methods (no numpy-function wrappers); "wrap" takes seq % capacity inside the gathers.
    win = np.empty((w, k), dtype=np.int64)
    win[back] = starts
    for j in range(back - 1, -1, -1):
        prev.take(win[j + 1], out=win[j], mode="wrap")
    for j in range(back + 1, w):
        next_.take(win[j - 1], out=win[j], mode="wrap")
    live = seq.take(win, mode="wrap") == win
    live &= win >= 0  # a missing link (-1) must not match an EMPTY slot
    flags = flags_of.take(win, mode="wrap")
    # Most windows lie inside one episode (no first step after column 0, no last step before the final
    # column nor at the start): then a row is ok iff all its steps are live, and nothing is padded.
    # Checked for all rows at once; a candidate set with any boundary takes the general path.
    if strict and not np.count_nonzero(flags & boundary_bits(back, ahead)):
        return win.T, all_true(k, ahead), flags[w - 1], live.all(axis=0)
    cols = np.arange(k)
    first = (flags & FIRST) != 0
    not_last = (flags & LAST) == 0
    good = live & not_last
    ok = good[back].copy() if strict else live[back].copy()
    if back:
        # Column j is padding once the episode's first step lies in columns j+1 .. back.
        padded = np.logical_or.accumulate(first[back:0:-1], axis=0)[::-1]
        ok &= (padded | good[:back]).all(axis=0)
        episode_first = win[padded.sum(axis=0), cols]
        win[:back] = np.where(padded, episode_first, win[:back])
    if ahead:
        # Column back+1+i is in the episode unless a last step lies in columns back .. back+i.
        alive = np.logical_and.accumulate(not_last[back : back + ahead], axis=0)
        real = live[back + 1 :] & ~first[back + 1 :]
        if strict:
            ok &= (real | ~alive).all(axis=0)
        else:
            alive = np.logical_and.accumulate(alive & real, axis=0)
        end = back + alive.sum(axis=0)
        win[back + 1 :] = np.where(alive, win[back + 1 :], win[end, cols])
    else:
        alive = np.zeros((0, k), dtype=bool)
        end = np.full(k, back)
    return win.T, alive.T, flags[end, cols], ok
