"""Metric writers: `metrics.jsonl` (one JSON object per row), TensorBoard events, a progress line.

Only process 0 writes (every process computes the same reduced metrics). Values are converted
to plain floats; NaN is written as `NaN` in JSONL (`json.dumps` default), which `json.loads`
and pandas read back.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars (fetched in one transfer) and numbers -> {name: float}."""
    fetched = jax.device_get(dict(metrics))
    out = {}
    for k, v in fetched.items():
        v = np.asarray(v)
        if v.size == 1:
            out[k] = float(v.reshape(()))
    return out


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:g}"
    return f"{value:.3g}"


class MetricsWriter:
    """Writes rows to `workdir/metrics.jsonl` and TensorBoard, and prints progress lines."""

    PROGRESS_KEYS = ("reward", "kl", "entropy", "completion_length", "turns/mean", "tool_calls/mean",
                     "eval/accuracy", "step_time")

    def __init__(self, workdir: str, *, total_steps: int | None = None, tensorboard: bool = True,
                 stream=None):
        self.is_writer = jax.process_index() == 0
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._start = time.perf_counter()
        if self.is_writer:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, row: Mapping[str, float]):
        if not self.is_writer:
            return
        record = {"step": int(step), **{k: float(v) for k, v in row.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if np.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def progress(self, step: int, row: Mapping[str, float], prefix: str = "step"):
        if not self.is_writer:
            return
        parts = [f"{prefix} {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        parts += [f"{k} {_fmt(row[k])}" for k in self.PROGRESS_KEYS if k in row]
        if prefix == "step" and self.total_steps and step > 0 and "step_time" in row:
            remaining = (self.total_steps - step) * row["step_time"]
            parts.append(f"eta {int(remaining // 60)}m{int(remaining % 60):02d}s")
        print(" | ".join(parts), file=self.stream, flush=True)

    def log_text(self, name: str, text: str):
        """Appends readable text (e.g. sample conversations) to `workdir/<name>`."""
        if not self.is_writer:
            return
        with open(os.path.join(os.path.dirname(self.path), name), "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The rows of `workdir/metrics.jsonl` (for notebooks and tests)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
