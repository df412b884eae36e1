"""Text reward functions for `Rubric`: correctness, format, tool use, length.

Each factory returns a plain function whose parameter names tell the rubric what to pass
(see `grpo_jax.rubrics.rubric`) and whose `__name__` is the metric name.
"""

from __future__ import annotations

from typing import Any, Callable

from grpo_jax.rubrics.numbers import math_equal
from grpo_jax.rubrics.parsers import XMLParser, think_answer_parser


def _named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    fn.__name__ = fn.__qualname__ = name
    return fn


def correct_answer(parser: XMLParser | None = None, *, symbolic: bool = False, rel_tol: float = 0.0,
                   name: str = "correct_answer") -> Callable[..., float]:
    """1.0 when the parsed answer equals the gold answer as a number (or expression), else 0.0.

    The answer is `parser.parse_answer(completion)`: exactly one `<answer>` outside the
    thinking, so several answers, nested tags or an answer only inside `<think>` score 0.
    """
    parser = parser or think_answer_parser()

    def fn(completion, answer) -> float:
        if answer is None:
            raise ValueError("row has no gold answer")
        return float(math_equal(parser.parse_answer(completion), str(answer), rel_tol=rel_tol,
                                symbolic=symbolic))
    return _named(fn, name)


def format_reward(parser: XMLParser | None = None, *, strict: bool = True,
                  name: str | None = None) -> Callable[..., float]:
    """1.0 when the last assistant message follows the parser's format (strict or lenient)."""
    parser = parser or think_answer_parser()
    check = parser.is_strict_format if strict else parser.is_lenient_format

    def fn(completion) -> float:
        return float(check(completion))
    return _named(fn, name or ("strict_format" if strict else "lenient_format"))


def tool_used(name: str = "tool_used") -> Callable[..., float]:
    """1.0 when the episode made at least one tool call and none of its calls failed.

    Reads `state["tool_calls"]` and `state["tool_errors"]` (kept by `ToolEnv`).
    """
    def fn(state) -> float:
        return float(state["tool_calls"] > 0 and state["tool_errors"] == 0)
    return _named(fn, name)


def tool_calls_metric(name: str = "tool_calls") -> Callable[..., float]:
    """Number of tool calls in the episode (use with weight 0)."""
    def fn(state) -> float:
        return float(state["tool_calls"])
    return _named(fn, name)


def tool_errors_metric(name: str = "tool_errors") -> Callable[..., float]:
    """Number of failed tool calls (raised, timed out, bad arguments, unknown tool; weight 0)."""
    def fn(state) -> float:
        return float(state["tool_errors"])
    return _named(fn, name)


def soft_overlong_penalty_value(length: int, max_length: int, cache_length: int) -> float:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13) for one length, in [-1, 0]:

        R(L) = 0 if L <= L_max - L_cache;  ((L_max - L_cache) - L) / L_cache if L <= L_max;  -1 beyond.

    The same formula as `token_rewards.soft_overlong_penalty`, for host scoring.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError("need 0 < cache_length <= max_length")
    soft_start = max_length - cache_length
    if length <= soft_start:
        return 0.0
    if length <= max_length:
        return (soft_start - length) / cache_length
    return -1.0


def overlong_penalty(max_length: int, cache_length: int, *, length_key: str = "completion_tokens",
                     name: str = "overlong_penalty") -> Callable[..., float]:
    """Soft overlong penalty on `state[length_key]`, the completion length in tokens.

    The rollout records the number of model tokens of each episode in
    `state["completion_tokens"]`; a missing length is a failure (NaN), not a silent 0.
    """
    def fn(state) -> float:
        return soft_overlong_penalty_value(int(state[length_key]), max_length, cache_length)
    return _named(fn, name)
