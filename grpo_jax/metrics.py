"""Metric writers: `metrics.jsonl` (one JSON object per row), TensorBoard events, a progress line.

Only process 0 writes (every process computes the same reduced metrics). Values are converted
to plain floats; NaN is written as `NaN` in JSONL (`json.dumps` default), which `json.loads`
and pandas read back.

Each row is appended with one write of the whole line, then fsync'ed: a kill leaves complete
rows and at most a torn last line, which readers skip and a resumed run removes (`grpo_jax.workdir.rewind`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)


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
                 stream=None, purge_step: int | None = None):
        """`purge_step`: TensorBoard hides the events of earlier runs at steps >= it (a resumed
        run's rewind, as `grpo_jax.workdir.rewind` does for metrics.jsonl)."""
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
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)

    def write(self, step: int, row: Mapping[str, float]):
        if not self.is_writer:
            return
        record = {"step": int(step), **{k: float(v) for k, v in row.items()}}
        append_line(self.path, json.dumps(record))
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


def append_line(path: str, line: str):
    """Appends `line` and its newline in one write, on disk before returning (O_APPEND: whole
    lines even with another writer)."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # one write in practice; a short write is finished, never dropped
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_metrics(path: str) -> tuple[list[dict[str, float]], int | None]:
    """(rows of the JSONL file `path`, the number of its torn last line or None).

    A torn line is an unterminated, unparseable last line (a writer killed mid-write); any other
    malformed line raises `ValueError` naming the file and line.
    """
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # split's last piece is the text after the last newline
                return rows, number
            raise ValueError(f"{path}:{number}: not a JSON row ({error}): {line[:120]!r}") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{number}: a metrics row is a JSON object with a step: {line[:120]!r}")
        rows.append(row)
    return rows, None


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The rows of `workdir/metrics.jsonl` (for notebooks and tests); a torn last line is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows, torn = parse_metrics(path)
    if torn is not None:
        log.warning("%s:%d: skipped a torn last line (a run killed mid-write)", path, torn)
    return rows
