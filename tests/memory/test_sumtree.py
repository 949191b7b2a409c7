"""The wide sum tree: sums, prefix-sum search and updates agree with plain numpy on the same leaves."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from borgdqn.memory.sumtree import FANOUT, SumTree, tree_buffer_size


def make_tree(n: int) -> SumTree:
    return SumTree(np.zeros(tree_buffer_size(n)), n)


def expected_leaf(leaves: np.ndarray, targets: np.ndarray) -> np.ndarray:
    # Leaf i owns the targets in [sum(leaves[:i]), sum(leaves[:i+1])).
    return np.searchsorted(np.cumsum(leaves), targets, side="right")


@pytest.mark.parametrize("n", [1, 2, FANOUT - 1, FANOUT, FANOUT + 1, FANOUT**2 + 3, 250_000])
def test_find_matches_prefix_sums(n: int) -> None:
    rng = np.random.default_rng(n)
    tree = make_tree(n)
    # Integers keep every sum exact, so the tree must agree with numpy exactly.
    leaves = rng.integers(0, 5, n).astype(np.float64)
    leaves[rng.integers(0, n)] = 3.0  # at least one non-zero leaf
    tree.set(np.arange(n), leaves)
    assert tree.total() == leaves.sum()
    targets = np.concatenate([rng.random(500) * leaves.sum(), np.cumsum(leaves)[leaves > 0][:50] - 0.5])
    index, values = tree.find(targets)
    np.testing.assert_array_equal(index, expected_leaf(leaves, targets))
    np.testing.assert_array_equal(values, leaves[index])
    assert (values > 0).all(), "a zero leaf was found"


def test_set_range_and_point_updates_keep_sums_exact() -> None:
    n = 5000
    rng = np.random.default_rng(1)
    tree = make_tree(n)
    leaves = np.zeros(n)
    for _ in range(200):
        if rng.random() < 0.5:
            start = int(rng.integers(0, n - 40))
            values = rng.integers(0, 9, 40).astype(np.float64)
            tree.set_range(start, values)
            leaves[start : start + 40] = values
        else:
            index = rng.integers(0, n, 32)
            values = rng.integers(0, 9, 32).astype(np.float64)
            tree.set(index, values)
            leaves[index] = values  # duplicates: numpy and the tree both keep the last one
    assert tree.total() == leaves.sum()
    targets = rng.random(1000) * leaves.sum()
    np.testing.assert_array_equal(tree.find(targets)[0], expected_leaf(leaves, targets))
    with pytest.raises(IndexError):
        tree.set_range(n - 1, np.ones(2))


def test_rebuild_recomputes_inner_nodes_from_leaves() -> None:
    n = 3000
    tree = make_tree(n)
    tree.set(np.arange(n), np.ones(n))
    tree.leaves[:] = np.arange(n) % 3  # written directly, as restore() does
    tree.rebuild()
    assert tree.total() == float((np.arange(n) % 3).sum())
    targets = np.linspace(0, tree.total() - 1e-9, 301)
    np.testing.assert_array_equal(tree.find(targets)[0], expected_leaf(np.arange(n) % 3.0, targets))


def test_targets_past_the_end_stay_in_range() -> None:
    n = FANOUT * 5 + 7
    tree = make_tree(n)
    tree.set(np.array([3, 100]), np.array([1.0, 2.0]))
    index, values = tree.find(np.array([0.5, 1.0, 2.9, 3.0, 1e9]))
    np.testing.assert_array_equal(index[:3], [3, 100, 100])
    # Past the end (rounding, racing writers): some leaf in range, with its true value (0 is a miss).
    assert (index < n).all()
    leaves = np.zeros(n)
    leaves[[3, 100]] = [1.0, 2.0]
    np.testing.assert_array_equal(values, leaves[index])


@settings(max_examples=60, deadline=None)
@given(
    leaves=st.lists(st.integers(0, 20), min_size=1, max_size=300).filter(lambda xs: sum(xs) > 0),
    seed=st.integers(0, 2**32 - 1),
)
def test_find_property(leaves: list[int], seed: int) -> None:
    values = np.array(leaves, dtype=np.float64)
    tree = make_tree(values.size)
    tree.set_range(0, values)
    targets = np.random.default_rng(seed).random(64) * values.sum()
    np.testing.assert_array_equal(tree.find(targets)[0], expected_leaf(values, targets))
