"""Seeded, deterministic generation of procedural task rows with disjoint splits.

A problem belongs to a split by a stable hash of its question (`split_of`), independent
of the seed that drew it, so the train and test splits never share a question whatever
seeds and sizes are used.  `generate_rows` draws problems from `numpy`'s generator seeded
with (seed, split) and keeps those of the wanted split, without repeats.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np

SPLITS = ("train", "test")
DEFAULT_ROWS = 1000  # rows of a procedural split when no size is asked for


def split_of(question: str, test_fraction: float = 0.1) -> str:
    """'test' for a stable `test_fraction` of all questions, 'train' for the rest."""
    digest = hashlib.sha256(question.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2 ** 64 < test_fraction else "train"


def generate_rows(make_row: Callable[[np.random.Generator], dict[str, Any]], split: str, n: int, seed: int = 0,
                  *, test_fraction: float = 0.1, max_draws_per_row: int = 200) -> list[dict[str, Any]]:
    """`n` distinct rows of `split` drawn with `make_row(rng)` (each row has a "question")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    rows, seen = [], set()
    for _ in range(max_draws_per_row * max(n, 1)):
        if len(rows) == n:
            return rows
        row = make_row(rng)
        question = row["question"]
        if question in seen or split_of(question, test_fraction) != split:
            continue
        seen.add(question)
        rows.append(row)
    if len(rows) < n:
        raise ValueError(f"could only draw {len(rows)} distinct {split} rows of {n}: widen the task")
    return rows
