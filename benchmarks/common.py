"""Shared benchmark helpers: a measured matmul peak, timing, and the environment of a run.

Every benchmark reports its model FLOP/s as a fraction of `matmul_peak_flops()`, measured in the
same process just before (the same machine, the same load), so figures from different runs and
machines compare as utilisation rather than raw speed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of `repeats` calls of `fn` (after `warmup` calls),
    each one blocked on its result with `jax.block_until_ready`."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def interleaved_times(runners: dict, repeats: int) -> dict:
    """Wall and process-CPU seconds per call, the runners called round-robin `repeats` times
    (after one warm-up call each), so a change in the machine's load hits all of them alike."""
    for run in runners.values():
        jax.block_until_ready(run())
    wall = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            (w,), (c,) = time_call(run, warmup=0, repeats=1)
            wall[name].append(w)
            cpu[name].append(c)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name]), wall[name])
            for name in runners}


def matmul_peak_rates(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> tuple[float, float]:
    """FLOP/s of a jitted n x n x n matmul (2 n^3 FLOPs) per wall second and per second of this
    process's CPU time, each from the median of `repeats` back-to-back runs."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    wall, cpu = time_call(lambda: matmul(a, b), warmup=2, repeats=repeats)
    flops = 2.0 * n ** 3
    return flops / statistics.median(wall), flops / statistics.median(cpu)


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """FLOP/s of a jitted n x n x n matmul (2 n^3 FLOPs), the median of `repeats` runs."""
    return matmul_peak_rates(n, dtype, repeats)[0]


def load_average() -> float | None:
    """The 1-minute load average (other processes compete for the cores), None if unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def environment_info() -> dict[str, Any]:
    """What a reader needs to interpret the figures: versions, device, cores, load."""
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": load_average(),
        "python": platform.python_version(),
    }


def check_positive(parser, args, names):
    """`parser.error` naming the first of `names` (argparse dests) set to a value <= 0."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
