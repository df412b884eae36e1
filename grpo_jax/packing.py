"""Packed train batches: several episodes per row, so the train step's FLOPs go to tokens.

One episode per row pads every row to the batch's longest episode; with heavy-tailed completion
lengths a third or more of the step's token positions are padding. `pack_rollout` places the
episodes of a `Rollout` (`grpo_jax.trajectories`) into rows of a fixed width W instead:

    rows      first-fit decreasing: episodes longest first, each into the first row it fits
              (at most 31 attention segments a row: cuDNN packed attention's bound, with padding's run)
              (an episode longer than W is an error naming it; the trainer's W is
              `rollout.max_seq_len`, which bounds every episode)
    row count rounded up to a multiple of `row_multiple` (data-parallel devices x rows per
              micro-batch), then to the next bucket `row_multiple x m x 2^e`, m in 8..15 (and
              1..7 below 8): eight sizes per octave, at most 12.5% extra rows, and only the
              few shapes the train step compiles for that the row count visits; capped at the
              one-episode-per-row count. Extra rows are all padding.

The packed batch is the train step's (`grpo_jax.train_step`), width W:

    tokens, loss_mask, old_logps   the episode's, at its offset in the row (pad_id / 0 after)
    positions                      as they are (restarting at 0 per attention segment)
    segment_ids                    the episode's segments renumbered to stay unique in the row
                                   (an agent episode's sub-sequences stay separate segments)
    sequence_ids                   k on the row's k-th episode, 0 on padding (the loss's
                                   per-sequence quantities: `grpo_jax.grpo`)
    advantages                     [B, W]: each episode's advantage on its positions (one
                                   per episode, or its per-token advantages: turn-level
                                   credit, `grpo_jax.credit.token_advantages`)

The loss, its gradient and its metrics are those of the same episodes one per row
(tests/test_packing.py): packing changes the cost of a step, not its update.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from grpo_jax.models.attention import CUDNN_MAX_SEGMENTS

ROW_KEYS = ("tokens", "positions", "segment_ids", "sequence_ids", "loss_mask", "old_logps",
            "advantages")


def bucket_rows(rows: int, row_multiple: int = 1, limit: int | None = None) -> int:
    """`rows` rounded up to a multiple of `row_multiple` and then to a bucket: `row_multiple`
    times 1..7, or m x 2^e with m in 8..15; at most `limit` rounded up to the multiple."""
    if row_multiple < 1:
        raise ValueError(f"row_multiple must be >= 1, got {row_multiple}")
    units = max(-(-rows // row_multiple), 1)
    if units > 8:
        e = units.bit_length() - 4  # units = m x 2^e + r with m in 8..15
        m = -(-units // (1 << e))
        units = m << e  # m = 16 is the next octave's 8
    if limit is not None:
        units = min(units, max(-(-limit // row_multiple), -(-rows // row_multiple), 1))
    return units * row_multiple


def first_fit(lengths, width: int, segments=None, max_segments: int | None = None) -> list[list[int]]:
    """First-fit decreasing: the episode indices of each row, longest first (ties by index).
    With `segments` (attention segments per episode), a row takes at most `max_segments` of
    them (an episode with more gets a row of its own).

    Raises `ValueError` naming the first episode longer than `width`."""
    lengths = np.asarray(lengths, np.int64)
    over = np.flatnonzero(lengths > width)
    if over.size:
        i = int(over[0])
        raise ValueError(f"episode {i} has {lengths[i]} tokens, more than the packed row width "
                         f"{width}: raise the width (the trainer's is rollout.max_seq_len)")
    free = np.zeros(len(lengths), np.int64)  # capacity left in each row opened so far
    segments = np.ones(len(lengths), np.int64) if segments is None else np.asarray(segments, np.int64)
    room = np.full(len(lengths), max_segments or np.iinfo(np.int64).max, np.int64)  # segments left
    rows: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero((free[:len(rows)] >= lengths[i]) & (room[:len(rows)] >= segments[i]))
        if fits.size:
            r = int(fits[0])
        else:
            r = len(rows)
            rows.append([])
            free[r] = width
        rows[r].append(int(i))
        free[r] -= lengths[i]
        room[r] -= segments[i]
    return rows


def padding_stats(real_tokens: int, rows: int, width: int, episodes: int,
                  unpacked_width: int) -> dict[str, float]:
    """`train/padding_frac` (share of the packed batch's positions that hold no episode's
    token), `train/padding_frac_unpacked` (the same, one episode per row of `unpacked_width`)
    and `train/rows`."""
    def frac(positions):
        return 1.0 - real_tokens / positions if positions else 0.0
    return {"train/padding_frac": frac(rows * width),
            "train/padding_frac_unpacked": frac(episodes * unpacked_width),
            "train/rows": float(rows)}


def pack_rollout(rollout, advantages, *, width: int | None = None, row_multiple: int = 1,
                 rows: int | None = None, pad_id: int = 0) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The packed train batch of `rollout`'s episodes (module docstring) and its stats.

    Args:
      rollout: a `Rollout` (its tokens, positions, segment_ids, loss_mask, logprobs, lengths).
      advantages: [N] one per episode, in the rollout's order, or [N, T] per token, aligned with
        `rollout.tokens` (`grpo_jax.credit.token_advantages`): each episode's first `length` copied.
      width: W, the row width; None: the rollout's padded width.
      row_multiple: the row count is a multiple of it (then bucketed, `bucket_rows`).
      rows: the row count instead of the bucketed one (>= the rows the episodes need): every
        process of a multi-process run packs to the largest count (`pad_rows` does it after).
      pad_id: the token of padding positions.

    Returns `(batch, stats)`: numpy arrays [rows, W] (`ROW_KEYS`) and `padding_stats`.
    """
    lengths = np.asarray(rollout.lengths, np.int64)
    advantages = np.asarray(advantages, np.float32)
    n = len(lengths)
    if advantages.shape not in ((n,), (n, rollout.tokens.shape[1])):
        raise ValueError(f"advantages must be [N] = ({n},), one per episode, or [N, T] = "
                         f"{rollout.tokens.shape} per token, got {advantages.shape}")
    short = np.flatnonzero(lengths < 2)
    if short.size:
        raise ValueError(f"episode {int(short[0])} has {lengths[short[0]]} tokens: a packed episode "
                         "needs 2 (its first token is never scored)")
    width = int(width or rollout.tokens.shape[1])
    # cuDNN's packed attention takes a bounded number of runs per row (padding's run included).
    plan = first_fit(lengths, width, rollout.segment_ids.max(axis=1, initial=0), CUDNN_MAX_SEGMENTS - 1)
    count = bucket_rows(len(plan), row_multiple, limit=n) if rows is None else rows
    if count < len(plan):
        raise ValueError(f"rows={count} is fewer than the {len(plan)} rows the episodes need")
    batch = _empty_rows(count, width, pad_id)
    for r, members in enumerate(plan):
        offset, segments = 0, 0
        for k, i in enumerate(members, start=1):
            length, span = int(lengths[i]), slice(offset, offset + int(lengths[i]))
            batch["tokens"][r, span] = rollout.tokens[i, :length]
            batch["positions"][r, span] = rollout.positions[i, :length]
            own = rollout.segment_ids[i, :length]
            batch["segment_ids"][r, span] = np.where(own > 0, own + segments, 0)
            segments += int(own.max(initial=0))
            batch["sequence_ids"][r, span] = k
            batch["loss_mask"][r, span] = rollout.loss_mask[i, :length]
            batch["loss_mask"][r, offset] = 0.0  # as position 0 of its own row: never scored
            batch["old_logps"][r, span] = rollout.logprobs[i, :length]
            batch["advantages"][r, span] = advantages[i, :length] if advantages.ndim == 2 else advantages[i]
            offset += length
    stats = padding_stats(int(lengths.sum()), count, width, n, int(rollout.tokens.shape[1]))
    return batch, stats


def _empty_rows(rows: int, width: int, pad_id: int) -> dict[str, np.ndarray]:
    """All-padding rows: pad_id tokens, zeros elsewhere."""
    out = {k: np.zeros((rows, width), np.float32 if k in ("loss_mask", "old_logps", "advantages")
                       else np.int32) for k in ROW_KEYS}
    out["tokens"][:] = pad_id
    return out


def pad_rows(batch: Mapping[str, Any], rows: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """`batch` with all-padding rows appended up to `rows` (every process of a multi-process
    run holds the same number of rows)."""
    have, width = np.shape(batch["tokens"])
    if rows < have:
        raise ValueError(f"cannot pad {have} rows down to {rows}")
    extra = _empty_rows(rows - have, width, pad_id)
    return {k: np.concatenate([np.asarray(v), extra[k].astype(np.asarray(v).dtype)]) for k, v in batch.items()}


def row_multiple(shards: int, micro_rows: int | None, processes: int = 1) -> int:
    """The multiple of one process's packed row count: the global count (processes x it) must
    split over the `shards` data-parallel devices and into micro-batches of `micro_rows`."""
    whole = math.lcm(shards, micro_rows or 1)
    return whole // math.gcd(whole, processes)
