"""Held-out evaluation: greedy accuracy, pass@k / mean@k, tool use, sample conversations.

An episode is *correct* when the rubric function named `correct_fn` (e.g. "correct_answer")
scores at least `threshold`; a failed (NaN) score counts as wrong. With k samples per problem
at temperature tau:

    pass@k = mean over problems of [any of the k samples is correct]
    mean@k = mean over problems of (correct samples / k)

(pass@k computed directly from k samples, i.e. the unbiased estimator of Chen et al. 2021 with
n = k.)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from grpo_jax import distributed
from grpo_jax.engine import EngineConfig
from grpo_jax.rollout import Rollout, RolloutConfig, model_sampler, rollout
from grpo_jax.sampling import SamplingConfig
from grpo_jax.trajectories import metrics_from_stats
from grpo_jax.utils import nan_mean


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    correct_fn: str = "correct_answer"   # rubric function that decides correctness
    threshold: float = 0.5               # score >= threshold counts as correct
    greedy: bool = True                  # greedy accuracy (temperature 0, one sample)
    k: int | None = None                 # samples per problem for pass@k / mean@k (None = off)
    temperature: float = 1.0             # sampling temperature for pass@k
    num_samples_logged: int = 3          # conversations written to the samples log

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1 or None (off), got {self.k}")
        if not 0 < self.temperature:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def _correct(scores, correct_fn: str, threshold: float) -> np.ndarray:
    if correct_fn not in scores.scores:
        raise KeyError(f"eval.correct_fn={correct_fn!r} is not a rubric function; the rubric has "
                       f"{sorted(scores.scores)}")
    values = np.asarray(scores.scores[correct_fn], np.float64)
    return np.where(np.isnan(values), False, values >= threshold)


def _tool_calls(result: Rollout) -> np.ndarray:
    return np.asarray([(s.get("tool_calls") or 0) > 0 for s in result.states])


def render_conversation(messages: Sequence[dict]) -> str:
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def evaluate(env, rows: Sequence[dict], tokenizer, model, key, *, sampling: SamplingConfig,
             rollout_config: RolloutConfig, config: EvalConfig = EvalConfig(),
             engine: EngineConfig | None = None) -> tuple[dict[str, float], str]:
    """Metrics (keys prefixed `eval/`) and a readable text of a few sample conversations.

    With several processes (`jax.distributed`), each rolls out its contiguous block of `rows`
    (`grpo_jax.distributed.process_block`) with `model`, which must then be a copy of the
    policy on the process's own devices (`components.Run.sampling_policy`); the per-problem
    results are gathered so that every process returns the metrics of all rows, equal to a
    single process evaluating them all. Every process must call it. `engine`: roll out on the
    engine with these settings (None: lockstep).
    """
    import jax

    start, stop = distributed.process_block(len(rows))
    local_rows = list(rows[start:stop])
    metrics: dict[str, float] = {"eval/num_problems": float(len(rows))}
    text = []
    if config.greedy:
        greedy_sampling = dataclasses.replace(sampling, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
        local = {}
        if local_rows:
            result = rollout(env, local_rows, tokenizer, model_sampler(model, greedy_sampling, engine),
                             jax.random.fold_in(key, 0),
                             dataclasses.replace(rollout_config, group_size=1, mask_truncated=False),
                             episode_offset=start)
            scores = result.score(env)
            correct = _correct(scores, config.correct_fn, config.threshold)
            local = {"correct": correct, "tool_calls": _tool_calls(result), "rewards": scores.rewards,
                     **{f"score/{k}": v for k, v in scores.scores.items()},
                     **{f"stat/{k}": v for k, v in result.episode_stats().items()}}
            shown = range(min(config.num_samples_logged - start, len(result)))
            local["text"] = [
                f"--- problem {start + i} ({'correct' if correct[i] else 'wrong'}; gold "
                f"{result.states[i].get('answer')})\n" + render_conversation(result.messages(i))
                for i in shown]
        merged = _merge([p for p in distributed.allgather_objects(local) if p])
        correct = merged["correct"]
        stats = {k[len("stat/"):]: v for k, v in merged.items() if k.startswith("stat/")}
        episodes = metrics_from_stats(stats, {})
        metrics.update({
            "eval/accuracy": float(correct.mean()),
            "eval/tool_call_rate": float(np.mean(merged["tool_calls"])),
            "eval/reward": nan_mean(merged["rewards"]),
            "eval/completion_length": float(episodes.get("completion_length/mean", np.nan)),
            "eval/turns": float(episodes.get("turns/mean", np.nan)),
            "eval/truncated_frac": float(episodes.get("truncated/frac", np.nan)),
        })
        for name, values in merged.items():
            if name.startswith("score/"):
                metrics[f"eval/reward/{name[len('score/'):]}"] = nan_mean(values)
        text = merged["text"]
    if config.k:
        sampled = dataclasses.replace(sampling, temperature=config.temperature)
        local = {}
        if local_rows:
            result = rollout(env, local_rows, tokenizer, model_sampler(model, sampled, engine), jax.random.fold_in(key, 1),
                             dataclasses.replace(rollout_config, group_size=config.k, mask_truncated=False),
                             episode_offset=start * config.k)
            correct = _correct(result.score(env), config.correct_fn, config.threshold)
            local = {"correct": correct.reshape(len(local_rows), config.k), "tool_calls": _tool_calls(result)}
        merged = _merge([p for p in distributed.allgather_objects(local) if p])
        correct = merged["correct"]
        metrics[f"eval/pass@{config.k}"] = float(correct.any(axis=1).mean())
        metrics[f"eval/mean@{config.k}"] = float(correct.mean())
        metrics[f"eval/tool_call_rate@{config.k}"] = float(np.mean(merged["tool_calls"]))
    return metrics, "\n".join(text)


def _merge(parts: Sequence[dict]) -> dict:
    """Per-process results (rows in process order) -> one; lists concatenate, arrays too."""
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        out[key] = sum(values, []) if isinstance(values[0], list) else np.concatenate(values)
    return out


def evaluate_run(run, params, step: int) -> tuple[dict[str, float], str]:
    """`evaluate` of `params` on a `components.Run`'s held-out rows, with the run's settings and
    the key fold_in(fold_in(root_key, step), 2**20); every process calls it. Adds eval/time_s."""
    start = time.perf_counter()
    key = jax.random.fold_in(jax.random.fold_in(run.root_key, step), 1 << 20)
    metrics, text = evaluate(run.env, run.eval_rows, run.tokenizer, run.sampling_policy(params), key,
                             sampling=run.sampling, rollout_config=run.rollout, config=run.eval, engine=run.engine)
    metrics["eval/time_s"] = time.perf_counter() - start
    return metrics, text
