"""Procedural tasks: safe arithmetic, arithmetic, countdown, the calculator-tool task, their audits."""

from fractions import Fraction

import numpy as np
import pytest

from grpo_jax.envs import EnvGroup, replay_episodes, run_episodes
from grpo_jax.envs.arithmetic import ArithmeticEnv, ArithmeticSpec
from grpo_jax.envs.calculator import CalculatorEnv, calculator
from grpo_jax.envs.countdown import CountdownEnv, check_solution
from grpo_jax.envs.procedural import split_of
from grpo_jax.envs.safe_math import ExpressionError, evaluate, parse_and_evaluate
from grpo_jax.rubrics import think_answer_parser


# -- safe arithmetic ---------------------------------------------------------------------------
@pytest.mark.parametrize("expression,value", [
    ("347*29", 10063), ("(347 + 58) * 12", 4860), ("7/2", Fraction(7, 2)), ("2**10", 1024), ("2^3", 8),
    ("-3 + 5", 2), ("7 // 2", 3), ("7 % 3", 1), ("2**-2", Fraction(1, 4)), ("0.1 + 0.2", Fraction(3, 10)),
    ("6 × 7 ÷ 2", 21),
])
def test_safe_evaluate(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression,message", [
    ("1/0", "division by zero"), ("__import__('os').system('true')", "unsupported"), ("x + 1", "unsupported"),
    ("9**9**9", "exponent"), ("10**31", "too large"), ("(10**20) * (10**20)", "too large"),
    ("1+" * 150 + "1", "longer than"), ("", "empty"), ("3 +", "invalid"), ("[1, 2]", "unsupported"),
    ("(1/3)**64", "too large"), ("2**0.5", "integer exponents"),
])
def test_safe_evaluate_refuses(expression, message):
    with pytest.raises(ExpressionError, match=message):
        evaluate(expression)


def test_operator_subset_and_literals():
    value, literals = parse_and_evaluate("(3 + 5) * 2", ops=("+", "*"), unary=False)
    assert value == 16 and literals == [3, 5, 2]
    with pytest.raises(ExpressionError, match="operator - is not allowed"):
        parse_and_evaluate("3 - 5", ops=("+", "*"))
    with pytest.raises(ExpressionError):
        parse_and_evaluate("-3 + 5", unary=False)


# -- procedural data ---------------------------------------------------------------------------
@pytest.mark.parametrize("env", [ArithmeticEnv("hard"), CountdownEnv(), CalculatorEnv()], ids=lambda e: e.name)
def test_datasets_are_seeded_and_splits_disjoint(env):
    train = env.dataset("train", 300, seed=0)
    assert train == env.dataset("train", 300, seed=0)
    assert train != env.dataset("train", 300, seed=1)
    test = env.dataset("test", 50, seed=0)
    assert len({r["question"] for r in train}) == 300
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert all(split_of(r["question"]) == "test" for r in test)
    assert all(r["task"] == env.name for r in train + test)
    with pytest.raises(ValueError):
        env.dataset("validation", 3)


def test_arithmetic_answers_and_difficulty():
    spec = ArithmeticSpec(num_operands=3, min_digits=2, max_digits=2, ops=("+", "/"))
    rows = ArithmeticEnv(spec).dataset("train", 50)
    for row in rows:
        assert row["answer"] == str(int(evaluate(row["info"]["expression"])))
        numbers = [int(t) for t in row["info"]["expression"].replace("(", " ").replace(")", " ").split()
                   if t.isdigit()]
        assert len(numbers) == 3
    assert any("/" in r["question"] for r in rows)
    medium = CalculatorEnv("medium").dataset("train", 50)
    for row in medium:
        a, op, b = row["info"]["expression"].split()
        assert op == "*" and 10 <= int(a) <= 999 and 10 <= int(b) <= 999
    # "3x3": operands 317..999, so every product has exactly 6 digits.
    for row in CalculatorEnv("3x3").dataset("train", 200):
        a, op, b = row["info"]["expression"].split()
        assert op == "*" and 317 <= int(a) <= 999 and 317 <= int(b) <= 999 and len(row["answer"]) == 6
    with pytest.raises(ValueError, match="min_operand"):
        ArithmeticEnv(ArithmeticSpec(2, 1, 2, ("+",), min_operand=500)).dataset("train", 5)


def test_countdown_solutions():
    rows = CountdownEnv().dataset("train", 50)
    for row in rows:
        numbers, target = row["info"]["numbers"], row["info"]["target"]
        assert check_solution(row["info"]["solution"], numbers, target)
        assert target not in numbers and 0 < target <= 1000
    numbers = [3, 7, 25, 50]
    assert check_solution("(50 - 25) * (7 - 3)", numbers, 100)
    assert check_solution("50 * 3 - 25 - 7", numbers, 118)
    assert not check_solution("50 * 3 - 25 - 7", numbers, 119)  # wrong value
    assert not check_solution("50 + 50", numbers, 100)  # 50 used twice
    assert not check_solution("4 * 25", numbers, 100)  # 4 is not given
    assert not check_solution("-3 + 50 + 53", numbers, 100)  # unary minus / foreign number
    assert not check_solution("2 ** 2 * 25", numbers, 100)  # ** not allowed
    assert check_solution("100", [100, 1], 100)  # a given number alone is an expression too
    assert not check_solution(None, numbers, 100) and not check_solution("", numbers, 100)


# -- calculator task ---------------------------------------------------------------------------
def test_calculator_tool_function():
    assert calculator("347*29") == "10063" and calculator("7/2") == "3.5" and calculator("1/3") == "0.333333"
    with pytest.raises(ExpressionError):
        calculator("1/0")


@pytest.mark.parametrize("tool_format", ["compact", "json"])
def test_calculator_gold_episodes_score_full(tool_format):
    env = CalculatorEnv(tool_format=tool_format)
    rows = env.dataset("train", 8)
    gold = [env.gold_completion(r) for r in rows]
    episodes = replay_episodes(env, rows, gold)
    assert [e.completion for e in episodes] == gold  # the env's tool replies are the gold ones
    scores = env.score_episodes(episodes)
    np.testing.assert_allclose(scores.rewards, 1.3)
    assert scores.metrics["reward/tool_calls"] == 1 and scores.metrics["reward/tool_errors"] == 0
    if tool_format == "compact":  # short, regular turns for a tiny model
        assert gold[0][0]["content"] == f"<calc>{rows[0]['info']['expression'].replace(' ', '')}</calc>"
        assert env.system_prompt.count("<") == 4 and len(env.system_prompt) < 100


def test_calculator_rewards_for_other_behaviours():
    env = CalculatorEnv()
    row = {"question": "What is 12 * 34?", "answer": "408", "info": {"expression": "12 * 34"},
           "task": "calculator"}
    policies = {
        "no_tool_right": lambda m: "<answer>408</answer>",
        "tool_error": lambda m: "<calc>12/0</calc>" if m[-1]["role"] == "user" else "<answer>408</answer>",
        "tool_wrong_answer": lambda m: "<calc>12*34</calc>" if m[-1]["role"] == "user" else "<answer>407</answer>",
        "never_answers": lambda m: "<calc>1+1</calc>",
        "bad_format": lambda m: "The answer is <answer>408</answer>",
    }
    episodes = {name: run_episodes(env, [row], p)[0] for name, p in policies.items()}
    scores = env.score_episodes(list(episodes.values()))
    totals = dict(zip(episodes, scores.rewards))
    assert totals == pytest.approx({"no_tool_right": 1.2, "tool_error": 1.2, "tool_wrong_answer": 0.3,
                                    "never_answers": 0.1, "bad_format": 1.0})
    assert "division by zero" in episodes["tool_error"].completion[1]["content"]
    assert env.num_turns(episodes["never_answers"].messages, episodes["never_answers"].state) == env.max_turns


# -- audits of the default rubrics -------------------------------------------------------------
@pytest.mark.parametrize("make_env", [
    lambda: ArithmeticEnv("medium"), lambda: ArithmeticEnv("hard", parser=think_answer_parser()),
    lambda: CountdownEnv(), lambda: CalculatorEnv(), lambda: CalculatorEnv(tool_format="json"),
], ids=["arithmetic", "arithmetic_think", "countdown", "calculator", "calculator_json"])
def test_default_task_rubrics_pass_the_audit(make_env):
    env = make_env()
    rows = env.dataset("test", 4)
    report = env.audit(rows, threshold=0.5)
    assert report.passed, report.summary()
    assert report.gold_score >= 1.2


def test_group_of_tasks_audits_and_scores():
    group = EnvGroup([ArithmeticEnv(), CountdownEnv(), CalculatorEnv()])
    rows = group.dataset("train", 9, seed=2)
    assert sorted(r["task"] for r in rows) == ["arithmetic"] * 3 + ["calculator"] * 3 + ["countdown"] * 3
    report = group.audit(rows)
    assert report.passed, report.summary()
    episodes = replay_episodes(group, rows, [group.gold_completion(r) for r in rows])
    scores = group.score_episodes(episodes)
    assert scores.metrics["reward/calculator"] == pytest.approx(1.3)
    assert scores.metrics["reward/countdown"] == pytest.approx(1.2)
