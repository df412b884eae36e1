"""How the train step splits its batch and combines what the parts report.

The batch's rows split into ``M`` mini-batches (``num_mini_batches``: one optimizer update each)
of ``n_micro`` micro-batches (``micro_batch_size`` rows: one gradient-accumulation step each),
laid out ``[M, n_micro, mb, ...]``. Both splits are strided: mini-batch m holds rows m, m + M,
m + 2M, ... and each micro-batch every n_micro-th of those, so every part is spread evenly over
the devices that hold the batch rows. The step's metrics are means over its mu x M updates.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from grpo_jax import grpo
from grpo_jax.train_inputs import TrainConfig


def to_micro(tree, n_micro: int, constrain: Callable):
    """[B, ...] -> [n_micro, B / n_micro, ...] with micro-batch k = rows k, k + n, k + 2n, ..."""
    def split(x):
        b = x.shape[0]
        x = x.reshape((b // n_micro, n_micro) + x.shape[1:])
        return constrain(jnp.swapaxes(x, 0, 1))
    return jax.tree.map(split, tree)


def scan(body, init, xs, length: int):
    """`lax.scan(body, init, xs)`, or one direct call when length is 1 (no loop for XLA to keep:
    the common mu = 1, one-micro-batch step then compiles like a plain forward + backward)."""
    if length > 1:
        return jax.lax.scan(body, init, xs)
    carry, ys = body(init, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda y: y[None], ys)


def batch_split(rows: int, cfg: TrainConfig) -> tuple[int, int]:
    """`(M, n_micro)`: the mini-batches (`num_mini_batches`) and the micro-batches of each."""
    n_mini = cfg.num_mini_batches
    if rows % n_mini:
        raise ValueError(f"num_mini_batches={n_mini} must divide the batch size {rows}")
    mini_rows = rows // n_mini
    mb = cfg.micro_batch_size or mini_rows
    if mini_rows % mb:
        if n_mini == 1:
            raise ValueError(f"micro_batch_size={mb} must divide the batch size {rows}")
        raise ValueError(f"the batch's {rows} rows must be a multiple of num_mini_batches x "
                         f"micro_batch_size = {n_mini} x {mb}: each update takes whole micro-batches")
    return n_mini, mini_rows // mb


def to_mini(tree, n_mini: int):
    """`to_micro`'s [M * n_micro, mb, ...] -> [M, n_micro, mb, ...], mini-batch m = rows m, m + M,
    m + 2M, ... (whatever the micro-batch size), micro-batch k of it every n_micro-th of those."""
    def split(x):
        x = x.reshape((x.shape[0] // n_mini, n_mini) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, tree)


def step_metrics(stats_IM: dict[str, jax.Array], sums_IMK: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The step's metrics from the [mu, M] update stats and the [mu, M, n_micro] metric sums:
    means over the mu x M updates; `lr` of the last update."""
    n_mini = next(iter(stats_IM.values())).shape[1]
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731 (one row per update)
    metrics = reduce_metric_sums(jax.tree.map(flat, sums_IMK), n_mini)
    metrics.update({k: jnp.mean(v) for k, v in stats_IM.items() if k != "lr"})
    if "lr" in stats_IM:
        metrics["lr"] = stats_IM["lr"][-1, -1]
    return metrics


def reduce_metric_sums(sums_KM: dict[str, jax.Array], n_mini: int = 1) -> dict[str, jax.Array]:
    """Per-micro-batch sums [updates, n_micro] -> finalised metrics [updates] -> means over the
    updates; counts: those of the first pass (its `n_mini` updates) over the batch."""
    reducers = {"sum": jnp.sum, "min": jnp.min, "max": jnp.max}
    per_iteration = {k: reducers[grpo.metric_reduction(k)](v, axis=1) for k, v in sums_KM.items()}
    finals = grpo.finalize_metrics(per_iteration)
    out = {}
    for name, value in finals.items():
        reduction = grpo.metric_reduction(name)
        if name in ("num_tokens", "num_sequences"):
            out[name] = value[0] if n_mini == 1 else jnp.sum(value[:n_mini])
        elif name.startswith("mismatch/"):   # of the policy before any update: the first one's
            out[name] = value[0]
        elif reduction == "sum":
            out[name] = jnp.mean(value)
        else:
            out[name] = reducers[reduction](value)
    return out
