"""Rules every replay backend applies alike when it samples: argument checks and importance weights."""

from __future__ import annotations

import numpy as np


def check_transition_args(batch_size: int, n_step: int, gamma: float, stack: int, beta: float) -> None:
    if batch_size < 1 or n_step < 1 or stack < 1 or not 0.0 < gamma <= 1.0 or beta < 0.0:
        raise ValueError(
            f"need batch_size, n_step, stack >= 1, 0 < gamma <= 1, beta >= 0; got {batch_size}, {n_step}, "
            f"{stack}, {gamma}, {beta}"
        )


def importance_weights(probs: np.ndarray, beta: float, population: int, prioritized: bool) -> np.ndarray:
    """(N * P(i)) ** -beta, max-normalised over the batch; ones when sampling is uniform or beta is 0."""
    if not prioritized or beta == 0.0:
        return np.ones(probs.shape[0], dtype=np.float32)
    w = probs * max(population, 1)
    w **= -beta
    w /= w.max()
    return w.astype(np.float32)
