"""A memory's contents to and from an ``.npz`` file (numpy arrays only: nothing is unpickled on load)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from borgdqn.memory.shared.layout import (
    EMPTY,
    H_HEAD,
    H_INSERTED,
    H_REJECTED,
    H_SIDE_HEAD,
    H_SIDE_TAIL,
    H_SIZE,
    SegmentParams,
)
from borgdqn.memory.shared.segment import Arrays, HeldLock

_SAVED = ("frames", "actions", "agents", "rewards", "flags", "prev", "next")


def save_ring(x: Arrays, params: SegmentParams, locked: HeldLock, path: Path) -> None:
    """Write the memory's contents to an ``.npz`` file while the hive keeps running.

    Slots rewritten during the copy are detected by their seq (as samplers do) and saved as empty.
    """
    before = x.seq.copy()
    with zipfile.ZipFile(Path(path), "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in _SAVED:
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, getattr(x, key))
        seq = np.where(x.seq == before, before, EMPTY)
        seq[seq < 0] = EMPTY
        with locked:
            small = {
                "seq": seq,
                "header": x.header.copy(),
                "headerf": x.headerf.copy(),
                "stream_keys": x.stream_keys.copy(),
                "stream_last": x.stream_last.copy(),
                "tree_leaves": x.tree.leaves.copy() if x.tree is not None else np.zeros(0),
                "side_id": x.side_id.copy(),
                "side_seq": x.side_seq.copy(),
                "side_tree_leaves": x.side_tree.leaves.copy() if x.side_tree is not None else np.zeros(0),
            }
        small["side_state"] = x.side_state.copy()
        small["side_ok"] = (x.side_id == small["side_id"]) & (x.side_seq == small["side_seq"])
        small["params"] = np.array(repr(params))
        for key, value in small.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, value)


def restore_ring(x: Arrays, params: SegmentParams, locked: HeldLock, path: Path) -> None:
    """Load a ``save``d memory into this (new, empty) one of the same parameters."""
    with np.load(Path(path), allow_pickle=False) as data:
        if str(data["params"]) != repr(params):
            raise ValueError(f"{path} was saved from a memory with other parameters: {data['params']}")
        with locked:
            if x.header[H_HEAD] != 0:
                raise RuntimeError("restore() needs a new, empty memory")
            for key in _SAVED:
                getattr(x, key)[:] = data[key]
            seq = data["seq"]
            header = data["header"]
            for field in (H_HEAD, H_INSERTED, H_REJECTED, H_SIDE_HEAD, H_SIDE_TAIL):
                x.header[field] = header[field]
            x.headerf[:] = data["headerf"]
            x.stream_keys[:] = data["stream_keys"]
            x.stream_last[:] = data["stream_last"]
            live = seq >= 0
            x.agent_counts[:] = np.bincount(x.agents[live], minlength=x.agent_counts.shape[0])
            x.header[H_SIZE] = int(live.sum())
            side_ok = data["side_ok"] & (data["side_seq"] >= 0)
            x.side_id[:] = np.where(side_ok, data["side_id"], -1)
            x.side_seq[:] = np.where(side_ok, data["side_seq"], EMPTY)
            x.side_state[:] = data["side_state"]
            if x.tree is not None:
                x.tree.leaves[:] = np.where(live, data["tree_leaves"], 0.0)
                x.tree.rebuild()
            if x.side_tree is not None:
                x.side_tree.leaves[:] = np.where(side_ok, data["side_tree_leaves"], 0.0)
                x.side_tree.rebuild()
            x.seq[:] = seq
