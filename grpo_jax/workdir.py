"""The workdir of a run: one run at a time, the config it belongs to, and its logs rewound on resume.

    workdir/.lock          flock'ed by the run (process 0) while it runs; holds pid, host, start
    workdir/config.json    the resolved config of the run that made the workdir's checkpoints
    workdir/metrics.jsonl  rows up to the restored step (`rewind`): a resumed run writes the rest
    workdir/samples.txt    "=== step N" sections, rewound the same way

A lock held by a dead process is no lock: the kernel drops a flock when its holder exits, however
it exits. A config that changes what the workdir's checkpoints or tokenizer were built from is
refused (naming the fields) unless `config.allow_config_change`; fields in `SAFE_TO_CHANGE`
(run length, cadences, evaluation, checkpointing, layout and performance knobs) may change. A
workdir holding nothing a run would reuse (no checkpoint, no trained tokenizer) takes any config.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import re
import socket
from typing import Any, Mapping

from grpo_jax.config_utils import ConfigError
from grpo_jax.metrics import parse_metrics

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"

# Fields a resumed run may change: none alters the shapes, tokenizer, data or objective that the
# workdir's checkpoints were made with (a prefix covers its whole group).
SAFE_TO_CHANGE = (
    "allow_config_change", "platform", "mesh", "checkpoint", "eval",
    "train.num_steps", "train.log_every", "train.eval_every", "train.store_rollouts", "sft.log_every",
    "model.remat", "model.attention", "model.kv_layout", "model.decode_attention", "grpo.chunk_size", "grpo.micro_batch_size", "grpo.micro_batch_tokens", "grpo.pack",
    "rollout.length_multiple",
    "sampling.prompt_bucket", "sampling.batch_bucket", "sampling.geometric_batch_buckets",
    "sampling.gather_weights",
)


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir's lock."""


# ---------------------------------------------------------------------------------------------
# The lock.
# ---------------------------------------------------------------------------------------------
class WorkdirLock:
    """An exclusive `fcntl.flock` on `workdir/.lock`, held until `release()` or process exit."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self._fd)
            os.close(self._fd)
            raise WorkdirBusy(f"{os.path.dirname(self.path)} is in use by another run ({holder}; lock "
                              f"{self.path}): wait for it to end, stop it, or use another workdir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode() + b"\n", 0)

    def release(self):
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an unlocked file names nobody
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):  # the holder is between open and its first write
        return "holder not yet recorded"


def lock(workdir: str) -> WorkdirLock:
    """Locks `workdir` for this process, or raises `WorkdirBusy` naming the run that holds it."""
    return WorkdirLock(workdir)


# ---------------------------------------------------------------------------------------------
# The recorded config.
# ---------------------------------------------------------------------------------------------
def config_dict(config) -> dict[str, Any]:
    """The resolved config as plain JSON values (tuples become lists, as they read back)."""
    return json.loads(json.dumps(config.to_dict(), default=repr))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _safe(field: str) -> bool:
    return any(field == s or field.startswith(s + ".") for s in SAFE_TO_CHANGE)


def config_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Fields outside `SAFE_TO_CHANGE` whose values differ, as "field: old -> new". A field only
    one side has is skipped: a field added to the code since keeps the old behaviour by default."""
    old, new = flatten(recorded), flatten(current)
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and not _safe(k)]


def _has_reusables(workdir: str) -> bool:
    """Whether a run would reuse something built here: a checkpoint or a trained tokenizer."""
    checkpoints = os.path.join(workdir, "checkpoints")
    steps = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    return any(s.isdigit() for s in steps) or os.path.isdir(os.path.join(workdir, "tokenizer"))


def check_config(workdir: str, config) -> None:
    """Refuses (`ConfigError`) a config that differs from `workdir/config.json` in fields that change
    what the workdir's checkpoints or tokenizer were built from, unless `config.allow_config_change`;
    then records `config` there."""
    path = os.path.join(workdir, CONFIG_FILE)
    current = config_dict(config)
    if os.path.exists(path) and _has_reusables(workdir):
        with open(path) as f:
            changes = config_changes(json.load(f), current)
        if changes and not config.get("allow_config_change", False):
            raise ConfigError(
                f"config.allow_config_change: the config differs from the one {workdir} was started with "
                f"({path}) in {len(changes)} field(s) that change what its checkpoints were built from: "
                + "; ".join(changes) + ". Use another workdir, or pass --config.allow_config_change=True "
                "to resume with the new values")
        if changes:
            log.warning("resuming %s with a changed config (allow_config_change): %s%s", workdir,
                        "; ".join(changes), "; the tokenizer trained in workdir/tokenizer is reused"
                        if any(c.startswith("tokenizer.") for c in changes) else "")
    atomic_write(path, json.dumps(current, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Logs rewound to the restored step.
# ---------------------------------------------------------------------------------------------
def atomic_write(path: str, text: str):
    """Replaces `path` by `text` all at once: a kill leaves the old file or the new one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_SECTION = re.compile(r"^=== step (\d+)$", re.MULTILINE)


def trim_samples(text: str, last_step: int | None) -> str:
    """The "=== step N" sections of samples.txt with N <= `last_step` (None: none)."""
    if last_step is None:
        return ""
    cut = next((m.start() for m in _SECTION.finditer(text) if int(m.group(1)) > last_step), len(text))
    return text[:cut]


def trim_metrics(path: str, last_step: int | None) -> int:
    """Rewrites the metrics file `path` with its rows up to `last_step` (None: none), without a
    torn last line; returns the number of rows dropped. A missing file stays missing."""
    if not os.path.exists(path):
        return 0
    rows, torn = parse_metrics(path)
    if torn is not None:
        log.warning("%s:%d: dropped a torn last line (a run killed mid-write)", path, torn)
    kept = [r for r in rows if last_step is not None and r["step"] <= last_step]
    if len(kept) < len(rows):
        log.warning("%s: dropped %d rows of a run killed %s", path, len(rows) - len(kept),
                    f"after its checkpoint of step {last_step}" if last_step is not None
                    else "before its first checkpoint")
    if len(kept) < len(rows) or torn is not None:
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(rows) - len(kept)


def rewind(workdir: str, last_step: int | None):
    """Drops what a killed run logged after `last_step`, the step a run starts from (None: a fresh
    start, so everything): rows of metrics.jsonl (its torn last line too) and samples.txt sections."""
    trim_metrics(os.path.join(workdir, "metrics.jsonl"), last_step)
    samples = os.path.join(workdir, "samples.txt")
    if os.path.exists(samples):
        with open(samples) as f:
            text = f.read()
        kept = trim_samples(text, last_step)
        if kept != text:
            atomic_write(samples, kept)
