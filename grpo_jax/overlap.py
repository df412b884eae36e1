"""Rollouts that overlap the update: step t + k is sampled while step t's update runs.

    train.staleness = 0    synchronous: the rollout of step t samples the weights after update
                           t - 1, then update t runs (`Collector.collect` in the loop's thread)
    train.staleness = k    before update t starts, the rollout of step t + k is queued with a
                           copy of the weights update t starts from; one worker thread runs the
                           queued rollouts in step order, so the rollout of step t + 1 runs while
                           update t runs on the device. Step s then trains on episodes sampled
                           from weights k updates older than the ones it updates (fewer in the
                           first k steps after a start or resume, which sample the start weights)

The update corrects for it as the config says: the clipped ratio against the sampler's
log-probs (`use_sampler_logps_as_old`, the default), or recomputed old log-probs with the
importance weight of the sampler's (`grpo.tis_cap`, `tis_mode`, `tis_level`); the step logs the
gap (`mismatch/*`, `grpo_jax.grpo`) and `offpolicy/staleness`. What overlaps is the rollout's
host work (the environment, reward functions, the engine's scheduling) and, on an accelerator
whose sampler and trainer programs can run together, the device work.

Staleness 0 runs exactly the synchronous loop. A run resumed with staleness k > 0 re-primes the
queue from the restored weights, so its first k steps differ from an uninterrupted run's.
Several processes, or several devices on a CPU host, run synchronously only (a refused config:
the worker's programs would enter collectives, or XLA:CPU's shared thread pool, out of order).
"""

from __future__ import annotations

import concurrent.futures
import time

import jax
import jax.numpy as jnp

from grpo_jax import platform
from grpo_jax.collector import Collected, Collector
from grpo_jax.utils import ConfigError


class RolloutQueue:
    """`get(step, params) -> Collected`: the batch of `step`, sampled up to `staleness` updates
    behind `params` (the weights the step's update starts from)."""

    def __init__(self, collector: Collector, staleness: int, last_step: int):
        self.collector, self.staleness, self.last_step = collector, int(staleness), last_step
        self.pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout")
                     if self.staleness else None)
        self.pending: dict[int, tuple[concurrent.futures.Future, int]] = {}

    def get(self, step: int, params) -> Collected:
        if not self.staleness:
            return _with_staleness(self.collector.collect(params, step), 0, 0.0)
        wanted = [s for s in range(step, min(step + self.staleness, self.last_step) + 1) if s not in self.pending]
        if wanted:
            # The update about to run donates `params`: the queued rollouts read a copy.
            policy = self.collector.run.sampling_policy(jax.tree.map(jnp.copy, params))
            for s in wanted:
                self.pending[s] = (self.pool.submit(self.collector.collect_with, policy, s), step - 1)
        future, version = self.pending.pop(step)
        started = time.perf_counter()
        collected = future.result()
        return _with_staleness(collected, step - 1 - version, time.perf_counter() - started)

    def close(self):
        """Waits for a running rollout, drops the queued ones."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def _with_staleness(collected: Collected, staleness: int, waited_s: float) -> Collected:
    row = {**collected.row, "offpolicy/staleness": float(staleness), "time/rollout_wait_s": waited_s}
    return collected._replace(row=row)


def check_overlap(config) -> None:
    """Refuses a staleness the run cannot overlap (module docstring), naming the field."""
    if not config.train.get("staleness", 0):
        return
    if jax.process_count() > 1:
        raise ConfigError("config.train.staleness > 0 runs on one process only (the queued rollouts' "
                          "gathers would interleave with the update's collectives): set it to 0")
    if platform.of_devices() == "cpu" and jax.device_count() > 1:
        raise ConfigError(f"config.train.staleness > 0 on a CPU host needs one device (XLA:CPU runs "
                          f"the {jax.device_count()} devices' programs on one thread pool, where two "
                          "multi-device programs in flight can deadlock): set it to 0")
