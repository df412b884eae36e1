"""Rewards: weighted reward functions (`Rubric`), parsers, numeric matching, token rewards, audit.

`import grpo_jax.rubrics` does not import jax or sympy; `token_rewards` (jax) and
`symbolic` (sympy) load when used.
"""

from grpo_jax.rubrics.audit import DEFAULT_HACKS, AuditReport, Hack, audit_rubric
from grpo_jax.rubrics.judge import engine_judge_client, judge_prompt, llm_judge, parse_verdict
from grpo_jax.rubrics.numbers import extract_gsm8k_answer, math_equal, parse_number
from grpo_jax.rubrics.parsers import (XMLParser, answer_parser, assistant_texts, last_assistant_text,
                                      think_answer_parser)
from grpo_jax.rubrics.rewards import (correct_answer, format_reward, overlong_penalty, tool_calls_metric,
                                      tool_errors_metric, tool_used)
from grpo_jax.rubrics.rubric import RewardError, Rubric, RubricScores, check_rewards, score_metrics
from grpo_jax.utils import run_sync

__all__ = [
    "Rubric", "RubricScores", "RewardError", "check_rewards", "score_metrics", "run_sync",
    "XMLParser", "answer_parser", "think_answer_parser", "assistant_texts", "last_assistant_text",
    "parse_number", "math_equal", "extract_gsm8k_answer",
    "correct_answer", "format_reward", "tool_used", "tool_calls_metric", "tool_errors_metric",
    "overlong_penalty",
    "llm_judge", "judge_prompt", "parse_verdict", "engine_judge_client",
    "Hack", "DEFAULT_HACKS", "AuditReport", "audit_rubric",
]
