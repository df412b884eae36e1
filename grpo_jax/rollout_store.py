"""The rollouts of a run, kept for rubric tuning: write each step's episodes, read them back,
re-score them with another rubric (no sampling) and compare.

    workdir/rollouts/step_000007.p0.jsonl.gz   step 7, process 0: one JSON line per episode

A line holds the episode's global id and group (`episode // group_size`), the prompt and
completion messages, the env state (JSON-safe: numpy scalars and arrays become numbers and
lists, tuples lists; a top-level key whose value will not serialise is dropped and named in
`dropped`, and `write_step` logs how many were), the finish reason, the token ids, the model's
tokens as `[start, end)` spans of the completion mask (`mask_spans`), the rollout's width `T`,
the unweighted score of every reward function, the reward and the advantage the update used
(non-finite numbers, failed functions, are written as null and read back as NaN). The row's
`answer`, `info` and `task` (what a rubric's `correct_answer` and friends need) are in the state:
`Environment.initial_state` puts them there and `env.score` reads them from it; `StoredEpisode`
has them as properties.

Each process writes its own file per step (`train.store_rollouts`, `grpo_jax.trainer`), through
a temporary file renamed into place: a crash leaves the step's file whole or absent, never torn.
A resumed run removes the files of steps past the one it restored (`rewind`); a re-run step
overwrites its file.

Reading (`read_rollouts`): a file that does not decode (truncated gzip, a bad line, a missing
field) raises `RolloutStoreError` naming the file and line, unless `on_error="skip"`: then the
whole file is skipped with a warning naming it, and the other files are read.

Re-scoring (`rescore`): the stored episodes scored by a `Rubric` or an `Environment`, with the
stored token ids for token reward functions, new rewards and group advantages, and a
`RescoreReport` comparing them with the stored ones (see there).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import os
import re
import zlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

DIRECTORY = "rollouts"
FORMAT = 1
_FILE = re.compile(r"^step_(\d{6,})\.p(\d+)\.jsonl\.gz$")


class RolloutStoreError(ValueError):
    """A stored rollout file that does not decode (the message names the file)."""


def step_path(workdir: str, step: int, process_index: int = 0) -> str:
    return os.path.join(workdir, DIRECTORY, f"step_{step:06d}.p{process_index}.jsonl.gz")


# ---------------------------------------------------------------------------------------------
# Writing.


def _json_safe(value: Any) -> Any:
    """`value` as plain JSON types; TypeError for what has none."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _plain(messages: Any) -> Any:
    """Messages as plain JSON (a value with no JSON form becomes its `str`)."""
    return json.loads(json.dumps(messages, default=str))


def _safe_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the state's serialisable keys, the names of the keys dropped)."""
    out, dropped = {}, []
    for key, value in state.items():
        try:
            out[str(key)] = _json_safe(value)
        except TypeError:
            dropped.append(str(key))
    return out, dropped


def _number(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _spans(mask: np.ndarray) -> list[list[int]]:
    """[start, end) spans of the True runs of a 1-d bool mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return [[int(s), int(e)] for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


def episode_records(step: int, rollout, scores, advantages, *, process_index: int = 0,
                    episode_offset: int = 0, episode_ids=None) -> tuple[list[dict[str, Any]], int]:
    """The JSON records of `rollout`'s episodes and the number of state keys dropped. Episode i's
    global id is `episode_ids[i]` when given (then `advantages` are these episodes'), else
    `episode_offset + i`."""
    n = len(rollout)
    ids = list(range(episode_offset, episode_offset + n)) if episode_ids is None else [int(i) for i in episode_ids]
    if len(ids) != n:
        raise ValueError(f"{n} episodes but {len(ids)} episode ids")
    advantages = np.asarray(advantages, np.float64).reshape(-1)
    if len(advantages) != n:  # the whole batch's: this process's slice
        advantages = advantages[episode_offset:episode_offset + n]
    if len(advantages) != n:
        raise ValueError(f"{n} episodes but {len(advantages)} advantages from offset {episode_offset}")
    records, dropped_count = [], 0
    for i in range(n):
        state, dropped = _safe_state(rollout.states[i])
        dropped_count += len(dropped)
        length = int(rollout.lengths[i])
        episode = ids[i]
        records.append({
            "format": FORMAT, "step": int(step), "process": int(process_index), "episode": episode,
            "group": episode // rollout.group_size, "group_size": int(rollout.group_size),
            "prompt": _plain(rollout.prompts[i]), "completion": _plain(rollout.completions[i]),
            "state": state, "dropped": dropped, "finish_reason": rollout.finish_reasons[i],
            "tokens": np.asarray(rollout.tokens[i, :length]).tolist(),
            "mask_spans": _spans(np.asarray(rollout.completion_mask[i, :length], bool)),
            "width": int(rollout.tokens.shape[1]),
            "scores": {name: _number(values[i]) for name, values in scores.scores.items()},
            "reward": _number(scores.rewards[i]), "advantage": _number(advantages[i])})
    return records, dropped_count


def atomic_write_gz(path: str, lines: Iterable[str]):
    """Writes `lines` gzipped to `path` through a temporary file renamed into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                for line in lines:
                    f.write(line.encode())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_step(workdir: str, step: int, rollout, scores, advantages, *, process_index: int = 0,
               episode_offset: int = 0, episode_ids=None) -> str:
    """Writes `rollout`'s episodes of `step` to `workdir/rollouts/step_{step:06d}.p{process}.jsonl.gz`.

    `scores`: the `RubricScores` of these episodes (this process's); `advantages`: theirs, or the
    whole batch's ([B], global order: this process's are sliced from `episode_offset`, the
    global id of its first episode). `episode_ids`: the episodes' ids in the batch instead, when
    they are not contiguous (dynamic sampling on several processes). Returns the path.
    """
    records, dropped = episode_records(step, rollout, scores, advantages, process_index=process_index,
                                       episode_offset=episode_offset, episode_ids=episode_ids)
    if dropped:
        log.warning("rollout store, step %d: %d state values were not JSON-serialisable and were dropped "
                    "(named per episode in `dropped`)", step, dropped)
    path = step_path(workdir, step, process_index)
    atomic_write_gz(path, (json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    return path


def store_step(run, step: int, rollout, scores, advantages, *, process_index: int, episode_ids):
    """The trainer's call: `write_step` of this process's episodes (their `advantages` and ids in
    the batch) when `train.store_rollouts` (a config without the field stores too)."""
    if run.config.train.get("store_rollouts", True):
        write_step(run.workdir, step, rollout, scores, advantages, process_index=process_index,
                   episode_ids=episode_ids)


def stored_files(workdir: str) -> list[tuple[int, int, str]]:
    """(step, process, path) of the stored files, by step then process (temporary files left out)."""
    directory = os.path.join(workdir, DIRECTORY)
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        m = _FILE.match(name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), os.path.join(directory, name)))
    return sorted(out)


def rewind(workdir: str, last_step: int | None, *, process_index: int | None = None):
    """Removes the files of steps after `last_step` (None: all of them) and temporary files left
    by a crash; of one process (`process_index`) or all."""
    for step, process, path in stored_files(workdir):
        if (last_step is None or step > last_step) and process_index in (None, process):
            os.remove(path)
    directory = os.path.join(workdir, DIRECTORY)
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if ".jsonl.gz.tmp-" in name and (process_index is None or f".p{process_index}." in name):
                os.remove(os.path.join(directory, name))


# ---------------------------------------------------------------------------------------------
# Reading.


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


@dataclasses.dataclass
class StoredEpisode:
    """One stored episode (see the module docstring for the fields)."""

    step: int
    process: int
    episode: int                  # global id within the step
    group: int                    # episode // group_size
    group_size: int
    prompt: list[dict]
    completion: list[dict]
    state: dict[str, Any]
    finish_reason: str
    tokens: list[int]
    mask_spans: list[list[int]]   # [start, end) spans of the model's tokens
    width: int                    # T of the step's rollout
    scores: dict[str, float]      # unweighted, NaN where the function failed
    reward: float                 # NaN where a weighted function failed
    advantage: float
    dropped: list[str] = dataclasses.field(default_factory=list)

    @property
    def answer(self):
        return self.state.get("answer")

    @property
    def info(self) -> dict:
        return self.state.get("info") or {}

    @property
    def task(self):
        return self.state.get("task")

    def mask(self, width: int | None = None) -> np.ndarray:
        """The completion mask, [width] (default: the episode's own length)."""
        out = np.zeros(len(self.tokens) if width is None else width, bool)
        for start, end in self.mask_spans:
            out[start:end] = True
        return out

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> "StoredEpisode":
        return cls(step=int(r["step"]), process=int(r["process"]), episode=int(r["episode"]),
                   group=int(r["group"]), group_size=int(r["group_size"]), prompt=r["prompt"],
                   completion=r["completion"], state=r["state"], finish_reason=r["finish_reason"],
                   tokens=list(r["tokens"]), mask_spans=[list(s) for s in r["mask_spans"]],
                   width=int(r["width"]), scores={k: _nan(v) for k, v in r["scores"].items()},
                   reward=_nan(r["reward"]), advantage=_nan(r["advantage"]), dropped=list(r.get("dropped", ())))


def read_file(path: str) -> list[StoredEpisode]:
    """The episodes of one stored file; `RolloutStoreError` naming the file when it does not decode."""
    out, line_number = [], 0
    try:
        with gzip.open(path, "rt") as f:
            for line_number, line in enumerate(f, 1):
                out.append(StoredEpisode.from_record(json.loads(line)))
    except (OSError, EOFError, zlib.error, ValueError, KeyError, TypeError) as e:
        where = f" (line {line_number})" if isinstance(e, (ValueError, KeyError, TypeError)) else ""
        raise RolloutStoreError(f"stored rollouts {path}{where} do not decode: {type(e).__name__}: {e}") from e
    return out


def read_rollouts(workdir: str, step: int | None = None, *, on_error: str = "raise") -> list[StoredEpisode]:
    """The stored episodes of `workdir` (all steps, or `step`), by step, process and episode.

    on_error: "raise" (default): `RolloutStoreError` naming the first file that does not decode;
    "skip": such a file is left out with a warning naming it.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out = []
    for file_step, _, path in stored_files(workdir):
        if step is not None and file_step != step:
            continue
        try:
            out.extend(read_file(path))
        except RolloutStoreError as e:
            if on_error == "raise":
                raise
            log.warning("skipped: %s", e)
    return sorted(out, key=lambda e: (e.step, e.episode))


# ---------------------------------------------------------------------------------------------
# Re-scoring.


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (ties: their average)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation over the pairs where both are finite (NaN when undefined)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    ra, rb = _ranks(a[ok]), _ranks(b[ok])
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _centred_signs(values_GS: np.ndarray) -> np.ndarray:
    """Sign of each value minus its group's NaN-mean (0 where NaN)."""
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(values_GS)
        mean = np.where(valid, values_GS, 0).sum(1, keepdims=True) / np.maximum(valid.sum(1, keepdims=True), 1)
        return np.where(valid, np.sign(np.round(values_GS - mean, 12)), 0)


def _has_variance(rewards_GS: np.ndarray) -> np.ndarray:
    valid = np.isfinite(rewards_GS)
    hi = np.where(valid, rewards_GS, -np.inf).max(1)
    lo = np.where(valid, rewards_GS, np.inf).min(1)
    return (valid.sum(1) > 1) & (hi > lo)


def _best_sets(rewards_GS: np.ndarray) -> list[frozenset | None]:
    out = []
    for row in rewards_GS:
        ok = np.isfinite(row)
        out.append(None if not ok.any() else frozenset(np.flatnonzero(ok & (row == row[ok].max())).tolist()))
    return out


@dataclasses.dataclass
class RescoreReport:
    """The stored episodes re-scored, compared with what was stored (arrays in `episodes` order:
    by step then episode; group g of the arrays is episodes g*S .. g*S+S-1).

    scores              the new `RubricScores`
    rewards, advantages the new ones [N]; stored_rewards, stored_advantages: the stored ones
    best_changed        [G] bool: the set of a group's top-reward episodes differs (groups where
                        either side has no finite reward: False); best_changed_frac its mean
    sign_flips          indices of episodes whose advantage changed sign (old * new < 0)
    lost_variance       indices of groups with reward variance before and none now
    gained_variance     indices of groups with none before and some now
    agreement           {name: {"spearman": ρ, "sign_accuracy": a}} of each new function score,
                        the new reward ("reward") and the stored one ("stored_reward") against the
                        correctness function (`correct_fn`): ρ over all episodes; a: the share of
                        episodes of groups where correctness varies whose group-centred sign
                        matches correctness's. Empty without `correct_fn`.
    """

    episodes: list[StoredEpisode]
    group_size: int
    scores: Any
    rewards: np.ndarray
    advantages: np.ndarray
    stored_rewards: np.ndarray
    stored_advantages: np.ndarray
    best_changed: np.ndarray
    sign_flips: np.ndarray
    lost_variance: np.ndarray
    gained_variance: np.ndarray
    agreement: dict[str, dict[str, float]]

    @property
    def num_groups(self) -> int:
        return len(self.best_changed)

    @property
    def best_changed_frac(self) -> float:
        return float(self.best_changed.mean()) if self.num_groups else 0.0

    def summary(self) -> dict[str, float]:
        """The comparison as flat floats (e.g. for a table or a JSON line)."""
        n, g = max(len(self.rewards), 1), max(self.num_groups, 1)
        diff = np.abs(self.rewards - self.stored_rewards)
        out = {"episodes": float(len(self.rewards)), "groups": float(self.num_groups),
               "best_changed_frac": self.best_changed_frac,
               "sign_flip_frac": len(self.sign_flips) / n,
               "lost_variance_frac": len(self.lost_variance) / g,
               "gained_variance_frac": len(self.gained_variance) / g,
               "reward_max_abs_diff": float(np.nanmax(diff)) if np.isfinite(diff).any() else 0.0,
               "reward_nan_changed": float((np.isnan(self.rewards) != np.isnan(self.stored_rewards)).sum())}
        for name, values in self.agreement.items():
            for key, value in values.items():
                out[f"agreement/{name}/{key}"] = value
        return out


def rescore(episodes: Sequence[StoredEpisode], rubric_or_env, *, group_size: int,
            advantage_scale: str = "group", correct_fn: str | None = None) -> RescoreReport:
    """Scores the stored `episodes` with `rubric_or_env` (a `Rubric`, scored with each episode's
    answer, info, task and state, or an `Environment`, through `env.score`), with their stored
    token ids for token reward functions; no sampling. New advantages: `group_advantages` of
    the new rewards (as the trainer computes them: float32, jitted).

    Episodes are sorted by (step, episode); every (step, group) must hold `group_size` of them.
    `correct_fn`: the name of the correctness function the agreement is measured against (a
    score of the new rubric, else of the stored ones).
    """
    import jax
    import jax.numpy as jnp

    from grpo_jax.advantages import group_advantages

    episodes = sorted(episodes, key=lambda e: (e.step, e.episode))
    n = len(episodes)
    if n == 0:
        raise ValueError("no episodes to re-score")
    keys = [(e.step, e.group) for e in episodes]
    sizes: dict[tuple[int, int], int] = {}
    for k in keys:
        sizes[k] = sizes.get(k, 0) + 1
    bad = {k: s for k, s in sizes.items() if s != group_size}
    if bad or any(keys[i] != keys[i - i % group_size] for i in range(n)):
        raise ValueError(f"every (step, group) needs {group_size} episodes; these have others: "
                         f"{dict(list(bad.items())[:5])}")

    width = max(max(e.width for e in episodes), max(len(e.tokens) for e in episodes))
    tokens = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), bool)
    for i, e in enumerate(episodes):
        tokens[i, :len(e.tokens)] = e.tokens
        mask[i] = e.mask(width)
    prompts, completions = [e.prompt for e in episodes], [e.completion for e in episodes]
    states = [dict(e.state) for e in episodes]
    if hasattr(rubric_or_env, "rubric") and hasattr(rubric_or_env, "initial_state"):
        scores = rubric_or_env.score(prompts, completions, states, tokens_BT=tokens, mask_BT=mask)
    else:
        scores = rubric_or_env.score(prompts, completions, [e.answer for e in episodes], states,
                                     [e.info for e in episodes], [e.task for e in episodes],
                                     tokens_BT=tokens, mask_BT=mask)
    rewards = np.asarray(scores.rewards, np.float64)
    advantages = np.asarray(jax.jit(group_advantages, static_argnums=(1, 2))(
        jnp.asarray(rewards.astype(np.float32)), group_size, advantage_scale), np.float64)
    stored_rewards = np.array([e.reward for e in episodes])
    stored_advantages = np.array([e.advantage for e in episodes])

    new_GS, old_GS = rewards.reshape(-1, group_size), stored_rewards.reshape(-1, group_size)
    best_changed = np.array([a is not None and b is not None and a != b
                             for a, b in zip(_best_sets(old_GS), _best_sets(new_GS))], bool)
    old_var, new_var = _has_variance(old_GS), _has_variance(new_GS)
    agreement = {}
    if correct_fn is not None:
        if correct_fn in scores.scores:
            correct = np.asarray(scores.scores[correct_fn], np.float64)
        elif all(correct_fn in e.scores for e in episodes):
            correct = np.array([e.scores[correct_fn] for e in episodes])
        else:
            raise ValueError(f"no scores of {correct_fn!r}: the rubric has {sorted(scores.scores)}, "
                             f"the stored episodes {sorted(episodes[0].scores)}")
        correct_signs = _centred_signs(correct.reshape(-1, group_size))
        varies = np.repeat(_has_variance(correct.reshape(-1, group_size)), group_size).reshape(-1, group_size)
        compared = {**{k: np.asarray(v, np.float64) for k, v in scores.scores.items()},
                    "reward": rewards, "stored_reward": stored_rewards}
        for name, values in compared.items():
            signs = _centred_signs(values.reshape(-1, group_size))
            accuracy = float((signs == correct_signs)[varies].mean()) if varies.any() else float("nan")
            agreement[name] = {"spearman": spearman(values, correct), "sign_accuracy": accuracy}
    return RescoreReport(
        episodes=episodes, group_size=group_size, scores=scores, rewards=rewards, advantages=advantages,
        stored_rewards=stored_rewards, stored_advantages=stored_advantages, best_changed=best_changed,
        sign_flips=np.flatnonzero(stored_advantages * advantages < 0),
        lost_variance=np.flatnonzero(old_var & ~new_var), gained_variance=np.flatnonzero(~old_var & new_var),
        agreement=agreement)
