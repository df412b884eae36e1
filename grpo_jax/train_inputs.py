"""What the train step takes: its static settings (`TrainConfig`) and its batch (`prepare_batch`).

The batch's keys and shapes are listed in `grpo_jax.train_step`'s docstring; `prepare_batch`
checks them and shifts the per-token arrays once (the logits at position t score token t + 1).
A packed batch (`grpo_jax.packing`: several episodes per row) adds `sequence_ids` and per-token
advantages; the token that starts a sequence is scored from the previous sequence's last
position, so it never counts (its mask is zeroed, as position 0's is).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from grpo_jax import grpo
from grpo_jax.utils import dataclass_from

_REQUIRED_KEYS = ("tokens", "loss_mask", "advantages")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings of the step (hashable; changing one recompiles). Checked when made: the
    loss settings by `grpo.check_settings`, the others here."""

    loss_type: str = "grpo"                   # one of grpo.LOSS_TYPES
    epsilon: float = 0.2                      # clip range low: ratio >= 1 - epsilon
    epsilon_high: float | None = None         # clip range high (None: epsilon); cispo needs it
    delta: float | None = None                # INTELLECT-2 two-sided clip of the ratio, > 1 + eps_high
    beta: float = 0.0                         # KL weight; > 0 needs reference params
    kl_estimator: str = "k3"                  # k1 | k2 | k3 (grpo.kl_estimate, Schulman 2020)
    max_completion_length: int | None = None  # dr_grpo's constant L
    # At most this many loss tokens (loss_mask != 0) per row, e.g. max_new_tokens x max_turns:
    # when fewer than the row's positions, the output head runs at each row's first
    # `max_loss_tokens` loss positions only (a row with more raises in `step`). None: everywhere
    # (packed batches: a row holds several episodes, so no per-episode budget bounds it).
    max_loss_tokens: int | None = None
    importance_sampling_level: str = "token"  # "token" or "sequence" (GSPO)
    temperature: float = 1.0                  # the sampler's temperature (greedy sampling: 1)
    num_iterations: int = 1                   # mu: optimizer updates on each batch
    micro_batch_size: int | None = None       # rows per gradient-accumulation step; None: all
    chunk_size: int | None = None             # vocabulary columns per log-prob chunk; None:
    #                                           `models.logprobs.DEFAULT_CHUNK_SIZE` (runs choose
    #                                           theirs by platform: `grpo_jax.platform`)
    use_sampler_logps_as_old: bool = True     # False: old log-probs from the policy in-step
    tis_cap: float | None = None              # importance-weight cap C of the sampler/trainer gap
    #                                           (needs False above; grpo.importance_weights)
    tis_mode: str = "truncate"                # truncate (TIS: min(w, C)) | mask (MIS: 0 where w > C)
    tis_level: str = "token"                  # token | sequence (w of a sequence on its tokens)
    entropy_coef: float = 0.0                 # entropy bonus: loss - coef x H (same normalisation)
    high_entropy_fraction: float | None = None  # rho: only the top rho of each micro-batch's tokens
    #                                           by entropy carry the policy gradient; None: all
    num_mini_batches: int = 1                 # M: optimizer updates per pass over the batch
    cispo_clip_low: bool = False              # cispo: also clip its weight below at 1 - epsilon
    fuse_projections: bool = True             # q/k/v, gate/up as one matmul each where unsharded

    def __post_init__(self):
        grpo.check_settings(loss_type=self.loss_type, epsilon=self.epsilon,
                            epsilon_high=self.epsilon_high, delta=self.delta,
                            importance_sampling_level=self.importance_sampling_level, beta=self.beta,
                            tis_cap=self.tis_cap, tis_mode=self.tis_mode, tis_level=self.tis_level,
                            entropy_coef=self.entropy_coef,
                            high_entropy_fraction=self.high_entropy_fraction)
        if self.kl_estimator not in grpo.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {grpo.KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.num_mini_batches < 1:
            raise ValueError(f"num_mini_batches must be >= 1, got {self.num_mini_batches}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        if self.max_loss_tokens is not None and self.max_loss_tokens < 1:
            raise ValueError(f"max_loss_tokens must be >= 1 or None, got {self.max_loss_tokens}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use 1 for greedy samples), got {self.temperature}")
        if self.tis_cap is not None and self.use_sampler_logps_as_old:
            raise ValueError("tis_cap corrects the sampler/trainer mismatch: it needs "
                             "use_sampler_logps_as_old=False (old log-probs recomputed in-step)")

    @classmethod
    def from_any(cls, config: "TrainConfig | Mapping[str, Any] | Any") -> "TrainConfig":
        """Accepts a TrainConfig, a dict or a ConfigDict with (a subset of) these fields."""
        return dataclass_from(cls, config, what="train config")


def prepare_batch(batch: Mapping[str, jax.Array], cfg: TrainConfig) -> dict[str, jax.Array]:
    """The model inputs [B, T] plus the shifted targets, mask and sampler log-probs [B, T - 1]
    (`sampler_logps`: whenever the batch has `old_logps`)."""
    missing = [k for k in _REQUIRED_KEYS if k not in batch]
    needs_sampler = cfg.use_sampler_logps_as_old or cfg.tis_cap is not None
    if needs_sampler and batch.get("old_logps") is None:
        missing.append("old_logps")
    if missing:
        raise ValueError(f"batch lacks {missing}; it has {sorted(batch)}")
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, T] with T >= 2, got {tokens.shape}")
    b, t = tokens.shape
    for name in ("positions", "segment_ids", "sequence_ids", "loss_mask", "old_logps"):
        if batch.get(name) is not None and jnp.shape(batch[name]) != (b, t):
            raise ValueError(f"{name} must be [B, T] = {(b, t)} like tokens, got {jnp.shape(batch[name])}")
    if jnp.shape(batch["advantages"]) not in ((b,), (b, t)):
        raise ValueError(f"advantages must be [B] = {(b,)} or [B, T] = {(b, t)}, got "
                         f"{jnp.shape(batch['advantages'])}")
    positions = batch.get("positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    advantages = jnp.asarray(batch["advantages"], jnp.float32)
    prepared = {
        "tokens": tokens,
        "positions": jnp.asarray(positions, jnp.int32),
        "segment_ids": jnp.asarray(segment_ids, jnp.int32),
        "mask": jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:],
        "advantages": advantages[:, 1:] if advantages.ndim == 2 else advantages,
    }
    if batch.get("sequence_ids") is not None:
        ids = jnp.asarray(batch["sequence_ids"], jnp.int32)
        prepared["sequence_ids"] = ids[:, 1:]  # the sequence of the scored token
        # A sequence's first token is scored from the previous sequence's context: no loss.
        prepared["mask"] = jnp.where(ids[:, 1:] == ids[:, :-1], prepared["mask"], 0.0)
    if batch.get("old_logps") is not None:  # also for the sampler/trainer gap metrics
        prepared["sampler_logps"] = jnp.asarray(batch["old_logps"], jnp.float32)[:, 1:]
    return prepared
