"""Byte layout of the shared replay segment: every array of the memory lives in one POSIX shared-memory block.

One block means one name to hand to child processes and one unlink at the end. Arrays start on 64-byte
boundaries (cache lines) so that no two arrays share a line that several processes write.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import numpy as np

from borgdqn.memory.sumtree import tree_buffer_size

ALIGN = 64
MAGIC = 0x42_4F_52_47_52_50_4C_31  # "BORGRPL1": attach() refuses a segment that is not ours
VERSION = 1

# Fields of the int64 header.
H_MAGIC = 0
H_VERSION = 1
H_HEAD = 2  # next sequence number to hand out; slot = seq % capacity
H_INSERTED = 3  # steps ever published
H_REJECTED = 4  # chunks refused
H_SIZE = 5  # steps stored and published now
H_SIDE_HEAD = 6  # next sequence-start entry id
H_SIDE_TAIL = 7  # oldest sequence-start entry id that may still be live
H_CLIENTS = 8  # attached instances so far (each owns one `sampled` counter)
H_FIELDS = 16
# Fields of the float64 header.
F_MAX_PRIORITY = 0  # largest priority ever given (new steps get it), before the alpha exponent
F_FIELDS = 8

# Slot states stored in `seq` besides a real sequence number (>= 0).
EMPTY = -1
WRITING = -2

# The per-step `flags` byte holds the bits of borgdqn.memory.sampling_rules (FIRST, LAST, TERMINATED).


@dataclass(frozen=True)
class SegmentParams:
    """Everything that fixes the segment's layout; travels in the handle so that attach() can rebuild it."""

    capacity: int
    frame_shape: tuple[int, ...]
    frame_dtype: str
    prioritized: bool
    alpha: float
    priority_eps: float
    recurrent_hidden: int | None
    max_streams: int
    max_agents: int
    max_sequences: int
    max_clients: int

    @property
    def stream_table_size(self) -> int:
        # Open addressing at load factor <= 1/2 keeps probe chains short; a power of two makes masking cheap.
        return 1 << max(4, math.ceil(math.log2(2 * self.max_streams)))


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Layout:
    arrays: tuple[ArraySpec, ...]
    nbytes: int

    @classmethod
    def build(cls, p: SegmentParams) -> Layout:
        c = p.capacity
        wanted: list[tuple[str, str, tuple[int, ...]]] = [
            ("header", "int64", (H_FIELDS,)),
            ("headerf", "float64", (F_FIELDS,)),
            ("sampled", "int64", (p.max_clients,)),
            ("agent_counts", "int64", (p.max_agents,)),
            ("stream_keys", "int64", (p.stream_table_size,)),
            ("stream_last", "int64", (p.stream_table_size,)),
            ("seq", "int64", (c,)),
            ("prev", "int64", (c,)),
            ("next", "int64", (c,)),
            ("actions", "int32", (c,)),
            ("agents", "int32", (c,)),
            ("rewards", "float32", (c,)),
            ("flags", "uint8", (c,)),
        ]
        if p.prioritized:
            wanted.append(("tree", "float64", (tree_buffer_size(c),)))
        if p.recurrent_hidden is not None:
            r = p.max_sequences
            wanted += [
                ("side_id", "int64", (r,)),
                ("side_seq", "int64", (r,)),
                ("side_state", "float32", (r, 2, p.recurrent_hidden)),
            ]
            if p.prioritized:
                wanted.append(("side_tree", "float64", (tree_buffer_size(r),)))
        # Frames last: the big array starts page-aligned after all the small ones.
        wanted.append(("frames", p.frame_dtype, (c, *p.frame_shape)))
        specs = []
        offset = 0
        for name, dtype, shape in wanted:
            align = 4096 if name == "frames" else ALIGN
            offset = -(-offset // align) * align
            spec = ArraySpec(name, dtype, shape, offset)
            specs.append(spec)
            offset += spec.nbytes
        return cls(tuple(specs), max(offset, 1))

    def views(self, buffer: mmap.mmap | bytearray) -> dict[str, np.ndarray]:
        return {
            s.name: np.frombuffer(
                buffer, dtype=s.dtype, count=int(np.prod(s.shape, dtype=np.int64)), offset=s.offset
            ).reshape(s.shape)
            for s in self.arrays
        }
