"""The metrics of the loss family (`grpo_jax.grpo`) as sums, and how they combine.

`policy_loss_sum` returns un-normalised metrics (token sums, a min and a max, counts) so that they
add up over micro-batches and shards like the loss; `combine_metric_sums` (or `psum`/`pmin`/`pmax`
per `metric_reduction`) combines parts and `finalize_metrics` turns the sums into averages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# How each metric sum combines across micro-batches and devices; unlisted keys add.
_MIN_MAX_METRICS = {"ratio/min": "min", "ratio/max": "max"}
COUNT_METRICS = ("num_tokens", "num_sequences")


def metric_sums(present_BT, num_tokens_S, dtype, ratio_BT, advantages_B1, clip_low_BT, clip_high_BT, *,
                kl_BT=None, delta=None, tis_weight_BT=None, raw_tis_BT=None, tis_cap=None,
                tis_mode="truncate", entropy_BT=None, keep_BT=None):
    """The un-normalised metrics of ``policy_loss_sum`` (token sums, min/max ratio, counts);
    the optional ones only when their input is given (TIS: ``raw_tis_BT``)."""
    def token_sum(x_BT):
        return jnp.sum(jnp.where(present_BT, x_BT, 0.0).astype(dtype))

    ratio_value_BT = jax.lax.stop_gradient(ratio_BT)
    sums = {
        "clip_ratio/low": token_sum(clip_low_BT),
        "clip_ratio/high": token_sum(clip_high_BT),
        "clip_ratio/region": token_sum(clip_low_BT | clip_high_BT),
        "ratio/mean": token_sum(ratio_value_BT),
        "ratio/min": jnp.min(jnp.where(present_BT, ratio_value_BT, jnp.inf)),
        "ratio/max": jnp.max(jnp.where(present_BT, ratio_value_BT, -jnp.inf)),
        "num_tokens": jnp.sum(present_BT, dtype=jnp.int32),
        "num_sequences": jnp.sum(num_tokens_S > 0, dtype=jnp.int32),
    }
    if kl_BT is not None:
        sums["kl"] = token_sum(jax.lax.stop_gradient(kl_BT))
    if delta is not None:
        sums["clip_ratio/delta"] = token_sum((ratio_value_BT > delta) & (advantages_B1 < 0))
    if raw_tis_BT is not None:
        sums["tis/weight_mean"] = token_sum(tis_weight_BT)
        sums["tis/frac_capped"] = token_sum(raw_tis_BT > tis_cap)
        if tis_mode == "mask":  # the same tokens: those the mask zeroes, under MIS's own name
            sums["tis/frac_masked"] = token_sum(raw_tis_BT > tis_cap)
    if entropy_BT is not None:
        sums["entropy"] = token_sum(jax.lax.stop_gradient(entropy_BT))
    if keep_BT is not None:
        sums["entropy/kept_frac"] = token_sum(keep_BT)
    return sums


def metric_reduction(name):
    """How metric sum ``name`` combines across parts: "sum", "min" or "max".

    Use it to reduce ``policy_loss_sum``'s metrics across devices (``psum``,
    ``pmin``, ``pmax``) inside ``shard_map``.
    """
    return _MIN_MAX_METRICS.get(name, "sum")


def combine_metric_sums(a, b):
    """Combine two ``policy_loss_sum`` metric dicts (of disjoint row sets)."""
    if set(a) != set(b):
        raise ValueError(f"metric sums have different keys: {sorted(a)} vs {sorted(b)}")
    combine = {"sum": jnp.add, "min": jnp.minimum, "max": jnp.maximum}
    return {k: combine[metric_reduction(k)](a[k], b[k]) for k in a}


def finalize_metrics(metric_sums):
    """Turn accumulated metric sums into the metrics of ``policy_loss``.

    Token sums are divided by ``num_tokens``; min/max pass through; counts stay
    counts. With no tokens, every average, min and max is 0.
    """
    num_tokens = metric_sums["num_tokens"]
    has_tokens = num_tokens > 0
    metrics = {}
    for name, value in metric_sums.items():
        if name in COUNT_METRICS:
            metrics[name] = value
        elif metric_reduction(name) == "sum":
            metrics[name] = value / jnp.maximum(num_tokens, 1).astype(value.dtype)
        else:
            metrics[name] = jnp.where(has_tokens, value, jnp.zeros_like(value))
    return metrics
