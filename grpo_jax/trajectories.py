"""`Rollout`: the episodes of a rollout as padded arrays, plus metrics.

Array conventions (N episodes, group-major: row i's `group_size` episodes are contiguous, the
layout `grpo_jax.advantages.group_advantages` expects; T = the longest episode rounded up to
`length_multiple`, at most `max_seq_len` when every episode fits it):

    tokens[i, t]           int32, the episode's ids, then `pad_id`
    completion_mask[i, t]  bool, True exactly on the model's own (sampled) tokens
    loss_mask[i, t]        float32, completion_mask, zeroed for masked episodes (truncated ones
                           under `mask_truncated`, env failures under `mask_env_errors`)
    logprobs[i, t]         float32, the sampler's log p(tokens[i, t] | tokens[i, :t]) where
                           completion_mask, 0 elsewhere. Aligned with `tokens`: a teacher-forced
                           `sequence_logprobs(model, tokens)[:, t - 1]` scores the same token.
    positions[i, t]        int32, t on real tokens, 0 on padding; with `segments`, the position
                           within the token's segment (restarting at 0)
    segment_ids[i, t]      int32, 1 on real tokens, 0 on padding; with `segments`, 1, 2, ... per
                           segment (the model's attention never crosses segments)
    lengths[i]             real tokens; prompt_lengths[i]: tokens of the first prompt

Metrics (floats, keys stable): turns/mean, turns/max, tool_calls/mean, tool_errors/mean,
tool_timeouts/mean, truncated/frac, masked/frac, env_errors (count), finish/<reason> (fraction
per finish reason), tokens_sampled (all model tokens), completion_length/mean (model tokens per
episode), sequence_length/mean, sequence_length/max, time/sampler_calls, time/sampler_s,
time/env_s, time/total_s, time/sampler_frac and time/env_frac (shares of the rollout's wall
time spent in sampler calls and waiting on env replies; the rest is host bookkeeping).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from grpo_jax.utils import round_up

FINISH_REASONS = ("completed", "max_turns", "length", "sequence_budget", "env_error")
TRUNCATION_REASONS = ("max_turns", "length", "sequence_budget")


@dataclasses.dataclass
class Rollout:
    """Trajectories of N episodes (see the module docstring for the array conventions)."""

    tokens: np.ndarray            # [N, T] int32
    loss_mask: np.ndarray         # [N, T] float32
    completion_mask: np.ndarray   # [N, T] bool
    logprobs: np.ndarray          # [N, T] float32
    positions: np.ndarray         # [N, T] int32
    segment_ids: np.ndarray       # [N, T] int32
    lengths: np.ndarray           # [N] int32
    prompt_lengths: np.ndarray    # [N] int32
    prompts: list[list[dict]]     # per episode: the prompt messages
    completions: list[list[dict]]  # per episode: assistant turns and env replies after the prompt
    states: list[dict]            # per episode: the env state (finish_reason, completion_tokens ...)
    finish_reasons: list[str]     # per episode: one of FINISH_REASONS
    num_turns: np.ndarray         # [N] int32 assistant turns
    truncated: np.ndarray         # [N] bool, finish reason in TRUNCATION_REASONS
    group_size: int
    metrics: dict[str, float]
    masked: np.ndarray | None = None  # [N] bool, episodes whose loss mask was zeroed

    def episode_stats(self) -> dict[str, np.ndarray]:
        """The per-episode numbers the rollout metrics are computed from (`episode_stats`)."""
        masked = np.zeros(len(self), bool) if self.masked is None else self.masked
        return episode_stats(self, masked)

    def __len__(self) -> int:
        return len(self.finish_reasons)

    def messages(self, i: int) -> list[dict]:
        """The whole conversation of episode i."""
        return self.prompts[i] + self.completions[i]

    def score(self, env, **kwargs):
        """`env.score` of the episodes, with the token arrays for token-level rewards."""
        return env.score(self.prompts, self.completions, self.states, tokens_BT=self.tokens,
                         mask_BT=self.completion_mask, **kwargs)


def pack_episodes(episodes: Sequence[Mapping[str, Any]], *, group_size: int, pad_id: int,
                  length_multiple: int = 32, max_seq_len: int | None = None,
                  mask_truncated: bool = False, mask_env_errors: bool = True,
                  timing: Mapping[str, float] | None = None) -> Rollout:
    """Pads per-episode lists into a `Rollout`.

    Each episode is a mapping with `tokens`, `mask` (1 on model tokens), `logprobs` (lists of
    equal length), `prompt`, `completion` (message lists), `state`, `finish_reason`, `num_turns`,
    and optionally `segments`: token counts of consecutive independent sequences packed in the
    row (agent episodes whose requests do not extend each other), summing to its length.
    """
    n = len(episodes)
    lengths = np.array([len(e["tokens"]) for e in episodes], np.int32)
    longest = int(lengths.max()) if n else 0
    width = max(round_up(max(longest, 1), length_multiple), 1)
    if max_seq_len is not None and longest <= max_seq_len:
        width = min(width, max_seq_len)
    tokens = np.full((n, width), pad_id, np.int32)
    completion_mask = np.zeros((n, width), bool)
    logprobs = np.zeros((n, width), np.float32)
    positions = np.zeros((n, width), np.int32)
    segment_ids = np.zeros((n, width), np.int32)
    for i, e in enumerate(episodes):
        length = lengths[i]
        if not len(e["mask"]) == len(e["logprobs"]) == length:
            raise ValueError(f"episode {i}: tokens, mask and logprobs differ in length")
        tokens[i, :length] = e["tokens"]
        completion_mask[i, :length] = np.asarray(e["mask"], bool)
        logprobs[i, :length] = np.where(completion_mask[i, :length], e["logprobs"], 0.0)
        segments = [int(k) for k in e.get("segments") or ([length] if length else [])]
        if sum(segments) != length or any(k < 1 for k in segments):
            raise ValueError(f"episode {i}: segments {segments} must be positive and sum to its {length} tokens")
        if length:
            starts = np.repeat(np.cumsum([0, *segments[:-1]]), segments)
            positions[i, :length] = np.arange(length) - starts
            segment_ids[i, :length] = np.repeat(np.arange(1, len(segments) + 1), segments)
    reasons = [e["finish_reason"] for e in episodes]
    unknown = set(reasons) - set(FINISH_REASONS)
    if unknown:
        raise ValueError(f"unknown finish reasons {sorted(map(str, unknown))}; known: {FINISH_REASONS}")
    truncated = np.array([r in TRUNCATION_REASONS for r in reasons], bool)
    masked = (truncated & mask_truncated) | (np.array([r == "env_error" for r in reasons], bool)
                                             & mask_env_errors)
    loss_mask = (completion_mask & ~masked[:, None]).astype(np.float32)
    prompt_lengths = np.array([_prompt_length(e) for e in episodes], np.int32)
    rollout = Rollout(
        tokens=tokens, loss_mask=loss_mask, completion_mask=completion_mask, logprobs=logprobs,
        positions=positions, segment_ids=segment_ids, lengths=lengths, prompt_lengths=prompt_lengths,
        prompts=[list(e["prompt"]) for e in episodes],
        completions=[list(e["completion"]) for e in episodes],
        states=[e["state"] for e in episodes], finish_reasons=reasons,
        num_turns=np.array([e["num_turns"] for e in episodes], np.int32), truncated=truncated,
        group_size=group_size, metrics={}, masked=masked)
    rollout.metrics = rollout_metrics(rollout, masked, timing or {})
    return rollout


def _prompt_length(episode: Mapping[str, Any]) -> int:
    """Tokens before the first model token (the whole sequence when the model never sampled)."""
    mask = episode["mask"]
    return next((t for t, m in enumerate(mask) if m), len(mask))


def rollout_metrics(rollout: Rollout, masked: np.ndarray, timing: Mapping[str, float]) -> dict[str, float]:
    """The metrics listed in the module docstring."""
    return metrics_from_stats(episode_stats(rollout, masked), timing)


STATE_COUNTERS = ("tool_calls", "tool_errors", "tool_timeouts")


def episode_stats(rollout: Rollout, masked: np.ndarray) -> dict[str, np.ndarray]:
    """[N] arrays, one entry per episode: what `metrics_from_stats` reduces. Episodes split over
    processes concatenate (in the global order) to the arrays of the whole batch."""
    stats = {
        "num_turns": np.asarray(rollout.num_turns),
        "truncated": np.asarray(rollout.truncated, bool),
        "masked": np.asarray(masked, bool),
        "model_tokens": rollout.completion_mask.sum(axis=1),
        "lengths": np.asarray(rollout.lengths),
        "finish_reason": np.array([FINISH_REASONS.index(r) for r in rollout.finish_reasons], np.int32),
    }
    for key in STATE_COUNTERS:
        stats[key] = np.asarray([s.get(key, 0) for s in rollout.states])
    return stats


def metrics_from_stats(stats: Mapping[str, np.ndarray], timing: Mapping[str, float]) -> dict[str, float]:
    """The rollout metrics of the episodes in `stats` (see `episode_stats`); `timing` gives the
    sampler/env seconds and the number of sampler calls."""
    count = len(stats["num_turns"])
    n = max(count, 1)

    def mean(key):
        return float(np.mean(stats[key])) if count else 0.0

    reasons = [FINISH_REASONS[i] for i in stats["finish_reason"]]
    model_tokens = stats["model_tokens"]
    sampler_s, env_s = float(timing.get("sampler_s", 0.0)), float(timing.get("env_s", 0.0))
    total_s = float(timing.get("total_s", sampler_s + env_s))
    metrics = {
        "turns/mean": mean("num_turns"),
        "turns/max": float(stats["num_turns"].max()) if count else 0.0,
        "tool_calls/mean": mean("tool_calls"),
        "tool_errors/mean": mean("tool_errors"),
        "tool_timeouts/mean": mean("tool_timeouts"),
        "truncated/frac": float(stats["truncated"].sum()) / n,
        "masked/frac": float(stats["masked"].sum()) / n,
        "env_errors": float(sum(r == "env_error" for r in reasons)),
        "tokens_sampled": float(model_tokens.sum()),
        "completion_length/mean": float(model_tokens.mean()) if count else 0.0,
        "sequence_length/mean": float(stats["lengths"].mean()) if count else 0.0,
        "sequence_length/max": float(stats["lengths"].max()) if count else 0.0,
        "time/sampler_calls": float(timing.get("sampler_calls", 0)),
        "time/sampler_s": sampler_s,
        "time/env_s": env_s,
        "time/total_s": total_s,
        "time/sampler_frac": sampler_s / total_s if total_s > 0 else 0.0,
        "time/env_frac": env_s / total_s if total_s > 0 else 0.0,
    }
    for reason in FINISH_REASONS:
        metrics[f"finish/{reason}"] = sum(r == reason for r in reasons) / n
    return metrics
