"""`Rubric`: a weighted set of reward functions scored over a batch of finished episodes.

Reward of episode i (Σ over functions with weight != 0):

    reward_i = Σ_k w_k · s_k(episode_i)   (+ Σ_j v_j · t_j(tokens_i, mask_i) for token functions)

Text reward functions
  A function declares what it needs by parameter name and gets exactly that:
    prompt      list of prompt messages
    completion  list of messages after the prompt (assistant turns and env replies)
    answer      the gold answer string of the row
    state       the episode's state dict (tool counters, lengths set by the rollout ...)
    info        the row's `info` dict
    task        the row's task name
    text        content of the last assistant message
    parser      the rubric's parser (or None)
    parsed      `parser.parse(completion)` ({field: str | None}), None without a parser
    parsed_answer  `parser.parse_answer(completion)` (str | None)
    <field>     each parser field not named like the above (e.g. `think`): its parsed content
  A function with `**kwargs` receives all of them.  Functions may be sync or `async def`;
  async ones are gathered concurrently (at most `max_concurrency` at once).

Failures
  Every call runs under `grpo_jax.guard`: a function that raises anything (`sys.exit()`
  included), times out (`timeout_s`, 30 s by default, always finite), dies (process mode), or
  returns something that is not a finite real number scores NaN for that sample, never 0.
  The episode's total reward is NaN when a weighted function failed on it (the advantage
  computation leaves NaN rewards out); a weight-0 function (a metric) failing only makes its
  own score NaN.  Failures are counted per function (`failures/<name>` in the metrics) and
  logged once per function per batch with the count and the first error.  Scoring never
  raises because a function failed; `check_rewards` raises `RewardError` when every reward
  of a batch is NaN (nothing to learn from), naming the failing functions.

Isolation (`isolation`)
  "process" (default): sync functions run in worker processes forked from this one, killed
  at the time limit; what they print (even `os.write(1, ...)`) is captured and logged, not
  shown on the console.  Functions are inherited by the fork (lambdas and closures work);
  arguments go by pickle.  Side effects of a function (appending to a list, counters) stay
  in the worker: use "thread" for functions that must change this process's state.
  "thread": sync functions run in daemon threads of this process; one that hangs is
  abandoned at the time limit and keeps running.  Async functions run on the event loop in
  both modes.  See `grpo_jax.guard`.

Token reward functions (`grpo_jax.rubrics.token_rewards.TokenReward`)
  Pure `jnp` functions `(tokens_BT, mask_BT) -> rewards_B` that run on device.  The trainer
  calls `jax.jit(rubric.token_rewards)(tokens_BT, mask_BT)` and adds the result to the host
  rewards; `score(..., tokens_BT=..., mask_BT=...)` does the same in one call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from grpo_jax import guard
from grpo_jax.rubrics.parsers import last_assistant_text
from grpo_jax.utils import nan_mean, run_sync

logger = logging.getLogger(__name__)

LOGGED_OUTPUT_CHARS = 500  # captured prints of a function shown in the log, per batch

ARGUMENT_NAMES = ("prompt", "completion", "answer", "state", "info", "task", "text", "parser", "parsed",
                  "parsed_answer")


def _field_arguments(parser: Any) -> tuple[str, ...]:
    """Parser fields offered as arguments of their own (those not shadowing a standard name)."""
    return tuple(f for f in getattr(parser, "fields", ()) if f not in ARGUMENT_NAMES)


@dataclasses.dataclass(frozen=True)
class RewardFunc:
    """One text reward function of a rubric, with the arguments it asks for."""
    fn: Callable[..., Any]
    name: str
    weight: float
    params: tuple[str, ...]
    takes_all: bool
    is_async: bool

    @classmethod
    def wrap(cls, fn: Callable[..., Any], weight: float = 1.0, name: str | None = None,
             extra_names: Sequence[str] = ()) -> "RewardFunc":
        name = name or getattr(fn, "__name__", None) or type(fn).__name__
        signature = inspect.signature(fn)
        params, takes_all = [], False
        for p in signature.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                takes_all = True
            elif p.kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            elif p.name in ARGUMENT_NAMES or p.name in extra_names:
                params.append(p.name)
            elif p.default is inspect.Parameter.empty:
                raise ValueError(f"reward function {name!r} asks for {p.name!r}; "
                                 f"available arguments: {ARGUMENT_NAMES + tuple(extra_names)}")
        return cls(fn, name, float(weight), tuple(params), takes_all, guard.is_async(fn))

    def arguments(self, context: dict[str, Any]) -> dict[str, Any]:
        return dict(context) if self.takes_all else {p: context[p] for p in self.params}


@dataclasses.dataclass
class RubricScores:
    """Scores of a batch of N episodes.

    rewards:  [N] float64 weighted total; NaN where a weighted function failed.
    scores:   {function name: [N] float64 unweighted score, NaN where it failed}.
    failures: {function name: number of failed samples}.
    errors:   {function name: first error message} for functions that failed.
    metrics:  {"reward": nan-mean of rewards, "reward/<name>": nan-mean of each function,
               "failures/<name>": failure counts, "reward_nan_fraction": share of NaN rewards}.
    """
    rewards: np.ndarray
    scores: dict[str, np.ndarray]
    failures: dict[str, int]
    errors: dict[str, str]
    metrics: dict[str, float]


def score_metrics(rewards: np.ndarray, scores: Mapping[str, np.ndarray], failures: Mapping[str, int],
                  tasks: Sequence[Any] | None = None) -> dict[str, float]:
    """`RubricScores.metrics` from the per-episode arrays: "reward" (NaN-mean of `rewards`),
    "reward_nan_fraction", and with `tasks` (an `EnvGroup`'s episodes) "reward/<task>" for each
    task; then "reward/<name>" (NaN-mean) and "failures/<name>" for each scored function. The
    same formulas serve one rubric's batch and a batch gathered from several processes."""
    rewards = np.asarray(rewards, np.float64)
    metrics = {"reward": nan_mean(rewards),
               "reward_nan_fraction": float(np.isnan(rewards).mean()) if len(rewards) else 0.0}
    if tasks is not None:
        tasks = np.asarray(tasks, dtype=object)
        for task in dict.fromkeys(tasks.tolist()):
            metrics[f"reward/{task}"] = nan_mean(rewards[tasks == task])
    for name, values in scores.items():
        metrics[f"reward/{name}"] = nan_mean(values)
        metrics[f"failures/{name}"] = float(failures.get(name, 0))
    return metrics


def _as_score(value: Any) -> float:
    """A returned value as a float score; raises on anything that is not a finite real number."""
    if isinstance(value, (bool, np.bool_, numbers.Real)):
        score = float(value)
    elif getattr(value, "shape", None) == () and np.issubdtype(np.asarray(value).dtype, np.number):
        score = float(value)  # 0-d numpy / jax arrays
    else:
        raise TypeError(f"returned {type(value).__name__} {str(value)[:50]!r}, not a number")
    if not math.isfinite(score):
        raise ValueError(f"returned non-finite {score}")
    return score


class RewardError(RuntimeError):
    """Every reward of a batch failed (NaN): training on it would learn nothing."""


def check_rewards(rewards: np.ndarray, metrics: Mapping[str, float] | None = None, *,
                  errors: Mapping[str, str] | None = None, step: int | None = None) -> None:
    """Raise `RewardError` when `rewards` is non-empty and all NaN.

    `metrics` (`RubricScores.metrics`, or the merged metrics of all processes) names the
    functions that failed, from their "failures/<name>" counts; `errors` adds their first
    error.  Call it on the rewards every process sees (after the gather) so all processes
    raise together.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.size == 0 or not np.isnan(rewards).all():
        return
    failed = sorted(((int(v), k.split("/", 1)[1]) for k, v in (metrics or {}).items()
                     if k.startswith("failures/") and v > 0), reverse=True)
    named = ", ".join(f"{name!r} ({count}/{rewards.size})" for count, name in failed) or "none counted"
    where = f" at step {step}" if step is not None else ""
    message = (f"every reward of the batch{where} is NaN ({rewards.size} episodes): nothing to learn from. "
               f"Failing reward functions: {named}.")
    for name, error in (errors or {}).items():
        message += f"\n  {name}: {error}"
    raise RewardError(message + "\nSee the log for their first errors and captured output.")


class Rubric:
    """Weighted reward functions (weight 0: logged metric, not rewarded).

    Args:
      funcs: text reward functions (see the module docstring for their arguments).
      weights: one weight per function (default 1.0 each).
      parser: parser handed to functions asking for `parser` / `parsed`.
      token_funcs: `TokenReward`s run on token arrays (see `token_rewards`).
      names: optional names for `funcs` (default: each function's `__name__`).
      timeout_s: per-call time limit of text functions (finite; default 30 s).  A call past
        it scores NaN (process mode: its worker is killed).
      isolation: "process" (default) or "thread", where sync functions run (module docstring).
      max_concurrency: most calls of one function in flight at once (async functions, thread
        mode); process mode runs as many as the guard has workers (`guard.configure_pool`).
    """

    def __init__(self, funcs: Sequence[Callable[..., Any]] = (), weights: Sequence[float] | None = None,
                 *, parser: Any = None, token_funcs: Sequence[Any] = (),
                 names: Sequence[str] | None = None, timeout_s: float = guard.DEFAULT_TIMEOUT_S,
                 isolation: str = "process", max_concurrency: int = 64):
        weights = [1.0] * len(funcs) if weights is None else list(weights)
        names = [None] * len(funcs) if names is None else list(names)
        if not len(weights) == len(names) == len(funcs):
            raise ValueError("funcs, weights and names must have the same length")
        self.parser = parser
        self.timeout_s = guard.check_timeout(timeout_s, "Rubric timeout_s")
        self.isolation = guard.check_isolation(isolation, "Rubric isolation")
        self.max_concurrency = max_concurrency
        self.funcs: list[RewardFunc] = []
        self.token_funcs: list[Any] = []
        self._jitted_token_rewards = None
        for fn, w, n in zip(funcs, weights, names):
            self.add(fn, w, n)
        for tf in token_funcs:
            self.add_token_func(tf)

    def __repr__(self):
        parts = [f"{f.name}={f.weight:g}" for f in self.funcs + self.token_funcs]
        return f"Rubric({', '.join(parts)})"

    def reweighted(self, weights: Mapping[str, float]) -> "Rubric":
        """A copy with some functions' weights changed (0 = metric only); unknown names fail."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"rubric has no functions {unknown}; it has {self.names}")
        copy = self.configured()
        copy.funcs = [dataclasses.replace(f, weight=float(weights.get(f.name, f.weight))) for f in self.funcs]
        copy.token_funcs = [dataclasses.replace(f, weight=float(weights.get(f.name, f.weight)))
                            for f in self.token_funcs]
        return copy

    def configured(self, *, timeout_s: float | None = None, isolation: str | None = None) -> "Rubric":
        """A copy with another time limit and / or isolation (None: keep this one's)."""
        copy = Rubric(parser=self.parser, timeout_s=self.timeout_s if timeout_s is None else timeout_s,
                      isolation=isolation or self.isolation, max_concurrency=self.max_concurrency)
        copy.funcs, copy.token_funcs = list(self.funcs), list(self.token_funcs)
        return copy

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.funcs] + [f.name for f in self.token_funcs]

    def _check_new_name(self, name: str):
        if name in self.names:
            raise ValueError(f"duplicate reward function name {name!r}")

    def add(self, fn: Callable[..., Any], weight: float = 1.0, name: str | None = None) -> "Rubric":
        """Add a text reward function; returns self."""
        func = RewardFunc.wrap(fn, weight, name, _field_arguments(self.parser))
        self._check_new_name(func.name)
        self.funcs.append(func)
        return self

    def add_token_func(self, token_func: Any) -> "Rubric":
        """Add a `TokenReward` (an object with `.fn`, `.name`, `.weight`); returns self."""
        self._check_new_name(token_func.name)
        self.token_funcs.append(token_func)
        self._jitted_token_rewards = None
        return self

    # -- token functions (device) ------------------------------------------------------------
    def token_rewards(self, tokens_BT, mask_BT):
        """(weighted total [B], {name: [B]}) of the token functions; pure, jittable, vmappable."""
        import jax.numpy as jnp
        per_func = {tf.name: tf.fn(tokens_BT, mask_BT).astype(jnp.float32) for tf in self.token_funcs}
        total = jnp.zeros(tokens_BT.shape[:-1], jnp.float32)
        for tf in self.token_funcs:
            if tf.weight != 0:
                total = total + tf.weight * per_func[tf.name]
        return total, per_func

    def _token_scores(self, tokens_BT, mask_BT) -> dict[str, np.ndarray]:
        import jax
        if self._jitted_token_rewards is None:
            self._jitted_token_rewards = jax.jit(self.token_rewards)
        _, per_func = self._jitted_token_rewards(tokens_BT, mask_BT)
        return {k: np.asarray(v, np.float64) for k, v in per_func.items()}

    # -- text functions (host) --------------------------------------------------------------
    def _contexts(self, prompts, completions, answers, states, infos, tasks) -> list[dict[str, Any]]:
        n = len(completions)

        def column(values, default):
            if values is None:
                return [default() for _ in range(n)]
            if len(values) != n:
                raise ValueError(f"expected {n} values, got {len(values)}")
            return list(values)

        prompts = column(prompts, list)
        answers, infos = column(answers, lambda: None), column(infos, dict)
        states, tasks = column(states, dict), column(tasks, lambda: None)
        contexts = []
        for i in range(n):
            parsed, parsed_answer = None, None
            if self.parser is not None:
                try:
                    parsed = self.parser.parse(completions[i])
                    parsed_answer = self.parser.parse_answer(completions[i])
                except Exception:  # functions asking for `parsed` then fail and are counted
                    parsed = None
            context = dict(prompt=prompts[i], completion=completions[i], answer=answers[i], state=states[i],
                           info=infos[i], task=tasks[i], parser=self.parser, parsed=parsed,
                           parsed_answer=parsed_answer, text=last_assistant_text(completions[i]))
            for field in _field_arguments(self.parser):
                context[field] = None if parsed is None else parsed.get(field)
            contexts.append(context)
        return contexts

    async def _gather(self, contexts) -> dict[str, list[guard.Outcome]]:
        async def run(func):
            return await guard.guarded_map(
                func.fn, [func.arguments(c) for c in contexts], timeout_s=self.timeout_s, isolation=self.isolation,
                convert=_as_score, max_output_chars=LOGGED_OUTPUT_CHARS, name=f"reward function {func.name!r}",
                max_concurrency=self.max_concurrency)
        results = await asyncio.gather(*(run(f) for f in self.funcs))
        return {f.name: r for f, r in zip(self.funcs, results)}

    def _assemble(self, contexts, outcomes, token_scores) -> RubricScores:
        n = len(contexts)
        scores, failures, errors = {}, {}, {}
        for func in self.funcs:
            results = outcomes[func.name]
            values = np.full(n, np.nan, np.float64)
            for i, r in enumerate(results):
                if r.ok:
                    values[i] = r.value
            failed = [r for r in results if not r.ok]
            scores[func.name] = values
            failures[func.name] = len(failed)
            if failed:
                errors[func.name] = failed[0].error
                logger.warning("reward function %r failed on %d/%d samples (scored NaN); first error: %s",
                               func.name, len(failed), n, errors[func.name])
            printed = [r for r in results if r.output_chars]
            if printed:
                logger.info("reward function %r printed on %d/%d samples (captured, not shown on the console); "
                            "first output (%d characters): %r", func.name, len(printed), n,
                            printed[0].output_chars, printed[0].output[:LOGGED_OUTPUT_CHARS])
        rewards = np.zeros(n, np.float64)
        for func in self.funcs:
            if func.weight != 0:
                rewards += func.weight * scores[func.name]  # NaN propagates
        for tf in self.token_funcs:
            if token_scores is not None:
                scores[tf.name] = token_scores[tf.name]
                failures[tf.name] = 0
                if tf.weight != 0:
                    rewards += tf.weight * token_scores[tf.name]
        return RubricScores(rewards, scores, failures, errors, score_metrics(rewards, scores, failures))

    def score(self, prompts, completions, answers=None, states=None, infos=None, tasks=None,
              *, tokens_BT=None, mask_BT=None) -> RubricScores:
        """Score N episodes (lists of length N; see the module docstring). Sync; safe in a loop.

        Token functions are scored (and added to `rewards`) only when `tokens_BT` and
        `mask_BT` ([N, T]) are given; otherwise the caller adds `token_rewards` itself.
        """
        contexts = self._contexts(prompts, completions, answers, states, infos, tasks)
        outcomes = run_sync(lambda: self._gather(contexts)) if self.funcs else {}
        token_scores = self._token_scores(tokens_BT, mask_BT) if (
            self.token_funcs and tokens_BT is not None) else None
        return self._assemble(contexts, outcomes, token_scores)

    async def ascore(self, prompts, completions, answers=None, states=None, infos=None, tasks=None,
                     *, tokens_BT=None, mask_BT=None) -> RubricScores:
        """`score` for async callers: async functions are awaited on the caller's loop."""
        contexts = self._contexts(prompts, completions, answers, states, infos, tasks)
        outcomes = await self._gather(contexts)
        token_scores = self._token_scores(tokens_BT, mask_BT) if (
            self.token_funcs and tokens_BT is not None) else None
        return self._assemble(contexts, outcomes, token_scores)


def rubric_weights(env) -> dict[str, float]:
    """{reward function: weight} of an env's rubric, text and token functions ({} for an env
    without one): the weights GDPO gives each function's advantages (`collector`), and the
    rubric the tuner starts from (`rubrics.tuning`)."""
    rubric = getattr(env, "rubric", None)
    if rubric is None:
        return {}
    return {f.name: float(f.weight) for f in list(rubric.funcs) + list(rubric.token_funcs)}
