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
from typing import Any, Sequence

import numpy as np

from grpo_jax.rollout import Rollout, RolloutConfig, model_sampler, rollout
from grpo_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    correct_fn: str = "correct_answer"   # rubric function that decides correctness
    threshold: float = 0.5               # score >= threshold counts as correct
    greedy: bool = True                  # greedy accuracy (temperature 0, one sample)
    k: int = 0                           # samples per problem for pass@k / mean@k (0 = off)
    temperature: float = 1.0             # sampling temperature for pass@k
    num_samples_logged: int = 3          # conversations written to the samples log


def _correct(scores, correct_fn: str, threshold: float) -> np.ndarray:
    if correct_fn not in scores.scores:
        raise KeyError(f"eval.correct_fn={correct_fn!r} is not a rubric function; the rubric has "
                       f"{sorted(scores.scores)}")
    values = np.asarray(scores.scores[correct_fn], np.float64)
    return np.where(np.isnan(values), False, values >= threshold)


def _tool_call_rate(result: Rollout) -> float:
    return float(np.mean([(s.get("tool_calls") or 0) > 0 for s in result.states]))


def render_conversation(messages: Sequence[dict]) -> str:
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def evaluate(env, rows: Sequence[dict], tokenizer, model, key, *, sampling: SamplingConfig,
             rollout_config: RolloutConfig, config: EvalConfig = EvalConfig()) -> tuple[dict[str, float], str]:
    """Metrics (keys prefixed `eval/`) and a readable text of a few sample conversations."""
    import jax

    metrics: dict[str, float] = {"eval/num_problems": float(len(rows))}
    text = []
    if config.greedy:
        greedy_sampling = dataclasses.replace(sampling, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
        result = rollout(env, rows, tokenizer, model_sampler(model, greedy_sampling), jax.random.fold_in(key, 0),
                         dataclasses.replace(rollout_config, group_size=1, mask_truncated=False))
        scores = result.score(env)
        correct = _correct(scores, config.correct_fn, config.threshold)
        metrics.update({
            "eval/accuracy": float(correct.mean()),
            "eval/tool_call_rate": _tool_call_rate(result),
            "eval/reward": float(np.nanmean(scores.rewards)) if np.isfinite(scores.rewards).any() else float("nan"),
            "eval/completion_length": float(result.metrics.get("completion_length/mean", np.nan)),
            "eval/turns": float(result.metrics.get("turns/mean", np.nan)),
            "eval/truncated_frac": float(result.metrics.get("truncated/frac", np.nan)),
        })
        for name, values in scores.scores.items():
            metrics[f"eval/reward/{name}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        for i in range(min(config.num_samples_logged, len(result))):
            verdict = "correct" if correct[i] else "wrong"
            text.append(f"--- problem {i} ({verdict}; gold {result.states[i].get('answer')})\n"
                        + render_conversation(result.messages(i)))
    if config.k > 0:
        sampled = dataclasses.replace(sampling, temperature=config.temperature)
        result = rollout(env, rows, tokenizer, model_sampler(model, sampled), jax.random.fold_in(key, 1),
                         dataclasses.replace(rollout_config, group_size=config.k, mask_truncated=False))
        correct = _correct(result.score(env), config.correct_fn, config.threshold).reshape(len(rows), config.k)
        metrics[f"eval/pass@{config.k}"] = float(correct.any(axis=1).mean())
        metrics[f"eval/mean@{config.k}"] = float(correct.mean())
        metrics[f"eval/tool_call_rate@{config.k}"] = _tool_call_rate(result)
    return metrics, "\n".join(text)
