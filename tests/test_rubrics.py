"""Rubric scoring (weights, metrics, async, failures), parsers, numeric matching, token rewards, audit."""

import asyncio
import logging
import math
import time
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.rubrics import (Rubric, answer_parser, audit_rubric, correct_answer, extract_gsm8k_answer,
                              format_reward, last_assistant_text, math_equal, parse_number,
                              think_answer_parser)
from grpo_jax.rubrics import token_rewards as tr
from grpo_jax.rubrics.rewards import overlong_penalty, soft_overlong_penalty_value


def _assistant(text):
    return [{"role": "assistant", "content": text}]


# -- Rubric ------------------------------------------------------------------------------------
def test_weighted_sum_and_metric_only_function():
    def one(completion):
        return 1.0

    def length(text):
        return len(text)

    def is_five(parsed):
        return parsed["answer"] == "5"

    rubric = Rubric([one, is_five, length], [0.5, 2.0, 0.0], parser=answer_parser())
    completions = [_assistant("<answer>5</answer>"), _assistant("<answer>6</answer>"), "plain text"]
    result = rubric.score(None, completions, ["5", "5", "5"])
    np.testing.assert_allclose(result.rewards, [2.5, 0.5, 0.5])  # weight-0 length adds nothing
    np.testing.assert_allclose(result.scores["length"], [18, 18, 10])
    assert result.metrics["reward/length"] == pytest.approx(46 / 3)
    assert result.metrics["reward"] == pytest.approx(3.5 / 3)
    assert result.metrics["reward/is_five"] == pytest.approx(1 / 3)
    assert all(v == 0 for v in result.failures.values())


def test_arguments_are_passed_by_name():
    seen = {}

    def spy(prompt, completion, answer, state, info, task, text, parser, parsed, parsed_answer, think):
        seen.update(prompt=prompt, answer=answer, state=state, info=info, task=task, text=text,
                    parser=parser, parsed=parsed, completion=completion, parsed_answer=parsed_answer, think=think)
        return 0.0

    def takes_all(**kwargs):
        return float(len(kwargs))

    parser = think_answer_parser()
    # `spy` changes this process's state: "thread" mode (in "process" mode the dict is the worker's).
    rubric = Rubric([spy, takes_all], parser=parser, isolation="thread")
    prompt = [{"role": "user", "content": "q"}]
    completion = [{"role": "assistant", "content": "<calc>1+1</calc>"}, {"role": "tool", "content": "2"},
                  {"role": "assistant", "content": "<think>easy</think><answer>2</answer>"}]
    result = rubric.score([prompt], [completion], ["2"], [{"turn": 2}], [{"k": 1}], ["calc"])
    assert seen["prompt"] == prompt and seen["completion"] == completion and seen["answer"] == "2"
    assert seen["state"] == {"turn": 2} and seen["info"] == {"k": 1} and seen["task"] == "calc"
    assert seen["text"] == "<think>easy</think><answer>2</answer>" and seen["parser"] is parser
    assert seen["parsed"] == {"think": "easy", "answer": "2"}
    assert seen["parsed_answer"] == "2" and seen["think"] == "easy"
    assert result.scores["takes_all"][0] == 11

    def checks(prompt, answer, state, info, task, parsed_answer, think, parser):  # the same, in a worker
        return float(prompt[0]["content"] == "q" and answer == "2" and state == {"turn": 2} and info == {"k": 1}
                     and task == "calc" and parsed_answer == "2" and think == "easy" and tuple(parser.fields) == ("think", "answer"))

    result = Rubric([checks, takes_all], parser=parser).score([prompt], [completion], ["2"], [{"turn": 2}],
                                                              [{"k": 1}], ["calc"])
    assert result.scores["checks"][0] == 1 and result.scores["takes_all"][0] == 11


def test_unknown_argument_and_duplicate_name_are_configuration_errors():
    def needs_nonsense(completion, nonsense):
        return 1.0

    with pytest.raises(ValueError, match="nonsense"):
        Rubric([needs_nonsense])

    def f(completion):
        return 1.0

    with pytest.raises(ValueError, match="duplicate"):
        Rubric([f, f])


def test_failing_functions_give_nan_counted_and_logged_once(caplog):
    def raises(answer):
        if answer == "bad":
            raise RuntimeError("boom")
        return 1.0

    def garbage(answer):
        return {"a": "str", "b": None, "c": float("nan"), "d": float("inf"), "e": [1.0]}.get(answer, 0.5)

    def metric_fails(answer):
        raise KeyError("missing")

    rubric = Rubric([raises, garbage, metric_fails], [1.0, 1.0, 0.0])
    answers = ["ok", "bad", "a", "b", "c", "d", "e", "ok"]
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rubrics.rubric"):
        result = rubric.score(None, [""] * len(answers), answers)
    assert result.failures == {"raises": 1, "garbage": 5, "metric_fails": 8}
    np.testing.assert_array_equal(np.isnan(result.scores["garbage"]), [0, 0, 1, 1, 1, 1, 1, 0])
    # Only weighted failures poison the total; the failing metric (weight 0) does not.
    expected = [1.5, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, 1.5]
    np.testing.assert_array_equal(result.rewards, expected)
    assert result.metrics["failures/metric_fails"] == 8 and math.isnan(result.metrics["reward/metric_fails"])
    assert result.metrics["reward_nan_fraction"] == pytest.approx(6 / 8)
    assert "boom" in result.errors["raises"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("'raises'" in m for m in messages) == 1  # once per function per batch
    assert sum("'garbage'" in m for m in messages) == 1


def test_async_functions_are_gathered_concurrently():
    async def slow_judge(answer):
        await asyncio.sleep(0.2)
        return float(answer == "yes")

    rubric = Rubric([slow_judge, format_reward(answer_parser())], [1.0, 0.5])
    n = 16
    start = time.perf_counter()
    result = rubric.score(None, [_assistant("<answer>1</answer>")] * n, ["yes", "no"] * (n // 2))
    elapsed = time.perf_counter() - start
    assert elapsed < 0.2 * n / 3  # sequential would take 3.2 s
    np.testing.assert_allclose(result.rewards, [1.5, 0.5] * (n // 2))

    async def from_running_loop():  # sync `score` inside a loop, and `ascore`
        a = rubric.score(None, [_assistant("x")] * 2, ["yes", "no"])
        b = await rubric.ascore(None, [_assistant("x")] * 2, ["yes", "no"])
        return a, b

    a, b = asyncio.run(from_running_loop())
    np.testing.assert_allclose(a.rewards, [1.0, 0.0])
    np.testing.assert_allclose(b.rewards, [1.0, 0.0])


def test_timeout_turns_a_hanging_function_into_nan():
    def hangs(answer):
        if answer == "hang":
            time.sleep(3)
        return 1.0

    rubric = Rubric([hangs], timeout_s=0.2)
    start = time.perf_counter()
    result = rubric.score(None, ["", ""], ["hang", "fine"])
    assert time.perf_counter() - start < 2
    np.testing.assert_array_equal(np.isnan(result.rewards), [True, False])
    assert result.failures["hangs"] == 1 and "TimeoutError" in result.errors["hangs"]


# -- parsers and numbers -----------------------------------------------------------------------
@pytest.mark.parametrize("text,fields,strict,lenient", [
    ("<think>hm</think>\n<answer>72</answer>", {"think": "hm", "answer": "72"}, True, True),
    ("<answer>72</answer>", {"think": None, "answer": "72"}, True, True),
    ("Sure! <answer>72</answer>", {"think": None, "answer": "72"}, False, True),
    ("<answer>71</answer><answer>72</answer>", {"think": None, "answer": None}, False, False),
    ("<answer><answer>72</answer></answer>", {"think": None, "answer": None}, False, False),
    ("<think><answer>72</answer></think>", {"think": "<answer>72</answer>", "answer": None}, False, False),
    ("<answer>72", {"think": None, "answer": None}, False, False),
    ("<answer>  </answer>", {"think": None, "answer": ""}, False, False),
])
def test_think_answer_parser(text, fields, strict, lenient):
    parser = think_answer_parser()
    assert parser.parse(text) == fields
    assert parser.parse(_assistant(text)) == fields
    assert parser.is_strict_format(text) == strict
    assert parser.is_lenient_format(text) == lenient


def test_parser_reads_last_assistant_message_and_formats():
    completion = [{"role": "assistant", "content": "<answer>1</answer>"}, {"role": "tool", "content": "x"},
                  {"role": "assistant", "content": "<answer>2</answer>"}]
    assert last_assistant_text(completion) == "<answer>2</answer>"
    assert answer_parser().parse_answer(completion) == "2"
    assert answer_parser().parse_answer(_assistant("<think>1</think><answer>3</answer>")) == "3"
    assert think_answer_parser().format(think="t", answer="5") == "<think>t</think>\n<answer>5</answer>"
    with pytest.raises(ValueError):
        answer_parser().format(think="t", answer="5")


@pytest.mark.parametrize("text,value", [
    ("72", Fraction(72)), ("$1,234", Fraction(1234)), ("72.", Fraction(72)), ("3/4", Fraction(3, 4)),
    ("\\boxed{72}", Fraction(72)), ("72 dollars", Fraction(72)), ("-5", Fraction(-5)),
    ("0.1", Fraction(1, 10)), ("\\frac{1}{2}", Fraction(1, 2)), ("1e3", Fraction(1000)),
    ("71 or 72", None), ("1,2,3", None), ("abc", None), ("", None), (None, None),
    ("0123456789" * 10, None), ("5-3", None), ("1e999999999", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_math_equal_numeric_and_symbolic():
    assert math_equal("1,234.0", "1234") and math_equal("0.50", "1/2") and not math_equal("72", "73")
    assert not math_equal("0.3333", "1/3") and math_equal("0.3333", "1/3", rel_tol=1e-3)
    assert not math_equal("347*29", "10063")  # an expression is not the number ...
    assert math_equal("347*29", "10063", symbolic=True)  # ... unless symbolic matching is asked for
    assert math_equal("\\frac{\\sqrt{8}}{2}", "\\sqrt{2}", symbolic=True)
    assert math_equal("x^2+2x+1", "(x+1)^2", symbolic=True)
    assert not math_equal("x^2", "2x", symbolic=True)
    assert not math_equal("__import__('os').system('true')", "0", symbolic=True)
    assert not math_equal("((99**99)**99)**99", "1", symbolic=True)  # refused, not computed
    assert extract_gsm8k_answer("She pays 2*3=<<2*3=6>>6.\n#### 1,206") == "1206"


def test_overlong_penalty_hand_values():
    # L_max = 10, L_cache = 4: no penalty up to 6, linear to -1 at 10, -1 beyond.
    lengths = [0, 6, 7, 8, 10, 11, 100]
    expected = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    assert [soft_overlong_penalty_value(n, 10, 4) for n in lengths] == expected
    np.testing.assert_allclose(tr.soft_overlong_penalty(jnp.array(lengths), 10, 4), expected)
    rubric = Rubric([overlong_penalty(10, 4)])
    result = rubric.score(None, [""] * 3, None, [{"completion_tokens": 8}, {"completion_tokens": 3}, {}])
    np.testing.assert_array_equal(result.rewards, [-0.5, 0.0, np.nan])  # a missing length fails


# -- token rewards -----------------------------------------------------------------------------
def _python_reference(tokens, mask, pattern, stop_ids, max_length, cache_length):
    """Plain-Python versions of the token rewards, row by row."""
    out = {"pattern": [], "stop": [], "length": [], "overlong": []}
    for row, row_mask in zip(tokens.tolist(), mask.tolist()):
        positions = [t for t, m in enumerate(row_mask) if m]
        found = any(all(t + k < len(row) and row_mask[t + k] and row[t + k] == p for k, p in enumerate(pattern))
                    for t in range(len(row)))
        out["pattern"].append(float(found))
        out["stop"].append(float(bool(positions) and row[positions[-1]] in stop_ids))
        out["length"].append(float(len(positions)))
        out["overlong"].append(soft_overlong_penalty_value(len(positions), max_length, cache_length))
    return {k: np.array(v) for k, v in out.items()}


def test_token_rewards_match_python_under_jit_and_vmap():
    rng = np.random.default_rng(0)
    B, T = 12, 16
    tokens = rng.integers(0, 5, (B, T)).astype(np.int32)
    starts, ends = rng.integers(0, 6, B), rng.integers(4, T + 1, B)
    mask = ((np.arange(T) >= starts[:, None]) & (np.arange(T) < ends[:, None])).astype(np.int32)
    mask[3] = 0  # a row without completion tokens
    mask[4, 5:7] = 0  # env tokens in the middle of a multi-turn completion
    tokens[0, 8:10] = [3, 1]  # make sure some rows contain the pattern
    pattern, stop_ids, max_len, cache = (3, 1), (0, 4), 10, 4
    funcs = {"pattern": tr.pattern_reward(pattern), "stop": tr.stop_token_reward(stop_ids),
             "length": tr.length_metric(), "overlong": tr.overlong_reward(max_len, cache)}
    reference = _python_reference(tokens, mask, pattern, stop_ids, max_len, cache)
    assert 0 < reference["pattern"].sum() < B and 0 < reference["stop"].sum() < B
    for name, func in funcs.items():
        eager = func.fn(jnp.asarray(tokens), jnp.asarray(mask))
        jitted = jax.jit(func.fn)(tokens, mask)
        per_row = jax.vmap(lambda t, m, f=func.fn: f(t[None], m[None])[0])(tokens, mask)
        stacked = jax.jit(jax.vmap(func.fn))(np.stack([tokens, tokens[::-1]]), np.stack([mask, mask[::-1]]))
        for got in (eager, jitted, per_row, stacked[0], stacked[1][::-1]):
            np.testing.assert_allclose(np.asarray(got, np.float64), reference[name], err_msg=name)


def test_rubric_combines_text_and_token_rewards():
    def correct(answer, text):
        return float(text == answer)

    rubric = Rubric([correct], [1.0], token_funcs=[tr.stop_token_reward((9,), weight=0.5), tr.length_metric()])
    tokens = jnp.array([[1, 2, 9], [1, 2, 3]])
    mask = jnp.array([[0, 1, 1], [0, 1, 1]])
    total, per_func = jax.jit(rubric.token_rewards)(tokens, mask)
    np.testing.assert_allclose(total, [0.5, 0.0])
    np.testing.assert_allclose(per_func["completion_tokens"], [2, 2])
    result = rubric.score(None, ["a", "b"], ["a", "a"], tokens_BT=tokens, mask_BT=mask)
    np.testing.assert_allclose(result.rewards, [1.5, 0.0])
    assert result.metrics["reward/ended_with_stop"] == 0.5 and result.metrics["reward/completion_tokens"] == 2


# -- audit -------------------------------------------------------------------------------------
ROWS = [{"question": "What is 347 * 29?", "answer": "10063", "info": {"expression": "347 * 29"}},
        {"question": "What is 12 + 30?", "answer": "42", "info": {"expression": "12 + 30"}}]


def test_audit_flags_a_hackable_rubric():
    def answer_anywhere(text, answer):
        return float(answer in text)

    hackable = Rubric([answer_anywhere, format_reward(answer_parser(), strict=False)], [1.0, 0.2])
    report = audit_rubric(hackable, ROWS, threshold=0.5)
    assert not report.passed
    for hack in ("answer_only_in_think", "several_answers", "answer_spam", "digit_wall", "answer_in_prose",
                 "very_long_output", "repeated_answer_tags", "unclosed_answer_tag"):
        assert hack in report.flagged, (hack, report.summary())
    assert "empty" not in report.flagged and "format_only" not in report.flagged

    symbolic = Rubric([correct_answer(answer_parser(), symbolic=True)], parser=answer_parser())
    assert audit_rubric(symbolic, ROWS).flagged == ["unevaluated_expression"]


def test_audit_passes_a_sound_rubric():
    parser = think_answer_parser()
    sound = Rubric([correct_answer(parser), format_reward(parser)], [1.0, 0.2], parser=parser)
    report = audit_rubric(sound, ROWS, threshold=0.5)
    assert report.passed, report.summary()
    assert report.scores["format_only"] == pytest.approx(0.2)
    assert max(report.scores.values()) <= 0.2


def test_reweighted_rubric_changes_only_the_weights():
    from grpo_jax.rubrics import Rubric

    def a(completion) -> float:
        return 1.0

    def b(completion) -> float:
        return 0.5

    rubric = Rubric([a, b], [1.0, 2.0])
    prompts, completions = [[{"role": "user", "content": "q"}]], [[{"role": "assistant", "content": "x"}]]
    assert rubric.score(prompts, completions).rewards[0] == 2.0
    only_a = rubric.reweighted({"b": 0.0})
    scores = only_a.score(prompts, completions)
    assert scores.rewards[0] == 1.0 and scores.scores["b"][0] == 0.5  # b still logged
    assert rubric.score(prompts, completions).rewards[0] == 2.0  # the original is unchanged
    with pytest.raises(ValueError, match="no functions"):
        rubric.reweighted({"c": 1.0})
