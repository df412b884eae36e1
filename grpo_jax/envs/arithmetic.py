"""Arithmetic: "What is 347 * 29?" answered as `<answer>10063</answer>` (single turn).

`ArithmeticSpec` sets the difficulty: operand count, digits per operand, operators.  With
several operands the expression is a random binary tree whose composite children are
parenthesised ("(347 + 58) * 12").  Division only appears where it is exact (a plain
number next to "/" is redrawn to make it so), so every answer is an integer.  The same
generator feeds the calculator-tool task.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from grpo_jax.envs.base import Row, SingleTurnEnv
from grpo_jax.envs.procedural import DEFAULT_ROWS, generate_rows
from grpo_jax.envs.safe_math import evaluate
from grpo_jax.rubrics.numbers import format_number
from grpo_jax.rubrics.parsers import XMLParser, answer_parser
from grpo_jax.rubrics.rewards import correct_answer, format_reward
from grpo_jax.rubrics.rubric import Rubric


@dataclasses.dataclass(frozen=True)
class ArithmeticSpec:
    """Difficulty of generated expressions."""
    num_operands: int = 2
    min_digits: int = 1
    max_digits: int = 2
    ops: tuple[str, ...] = ("+", "-", "*")
    min_operand: int = 0          # operands are at least this (e.g. to fix a product's width)


DIFFICULTIES = {
    "easy": ArithmeticSpec(2, 1, 2, ("+", "-", "*")),
    "medium": ArithmeticSpec(2, 2, 3, ("*",)),
    "hard": ArithmeticSpec(3, 1, 3, ("+", "-", "*")),
    # 3-digit times 3-digit, operands 317..999 so that every product has 6 digits: operands and
    # results of fixed width put every digit a copy needs at a fixed offset, which a tiny model
    # learns reliably (the calculator task's default CPU experiment).
    "3x3": ArithmeticSpec(2, 3, 3, ("*",), min_operand=317),
}


def spec_for(difficulty: str | ArithmeticSpec) -> ArithmeticSpec:
    return DIFFICULTIES[difficulty] if isinstance(difficulty, str) else difficulty


def _operand(rng: np.random.Generator, spec: ArithmeticSpec) -> int:
    digits = int(rng.integers(spec.min_digits, spec.max_digits + 1))
    low = max(10 ** (digits - 1) if digits > 1 else 0, spec.min_operand)
    if low >= 10 ** digits:
        raise ValueError(f"no {digits}-digit operand is >= min_operand={spec.min_operand}")
    return int(rng.integers(low, 10 ** digits))


def _expression(rng: np.random.Generator, spec: ArithmeticSpec, count: int) -> tuple[str, bool]:
    """(text, is_composite) of a random expression over `count` operands."""
    if count == 1:
        return str(_operand(rng, spec)), False
    left_count = int(rng.integers(1, count))
    left, left_composite = _expression(rng, spec, left_count)
    right, right_composite = _expression(rng, spec, count - left_count)
    op = str(rng.choice(spec.ops))
    if op == "/":  # exact division only: adjust a plain-number side, else multiply instead
        dividend, divisor = evaluate(left), evaluate(right)
        if divisor != 0 and (dividend / divisor).denominator == 1:
            pass
        elif not left_composite and divisor != 0 and divisor.denominator == 1:
            left = str(_operand(rng, spec) * abs(int(divisor)))
        elif not right_composite and dividend != 0 and dividend.denominator == 1:
            bound = min(abs(int(dividend)), 10 ** spec.max_digits)
            divisors = [d for d in range(2, bound) if dividend % d == 0]
            if divisors:
                right = str(int(rng.choice(divisors)))
            else:
                op = "*"
        else:
            op = "*"
    left = f"({left})" if left_composite else left
    right = f"({right})" if right_composite else right
    return f"{left} {op} {right}", True


def make_problem(rng: np.random.Generator, spec: ArithmeticSpec) -> dict[str, Any]:
    """A row: question, integer answer, and the expression in `info`."""
    for _ in range(100):
        expression, _ = _expression(rng, spec, spec.num_operands)
        value = evaluate(expression)
        if value.denominator == 1:
            break
    return {"question": f"What is {expression}?", "answer": format_number(value),
            "info": {"expression": expression}}


def arithmetic_rubric(parser: XMLParser) -> Rubric:
    """correct_answer (1.0) + strict_format (0.2)."""
    return Rubric([correct_answer(parser), format_reward(parser)], [1.0, 0.2], parser=parser)


class ArithmeticEnv(SingleTurnEnv):
    """Single-turn arithmetic; `difficulty` is a preset name or an `ArithmeticSpec`."""
    name = "arithmetic"

    def __init__(self, difficulty: str | ArithmeticSpec = "easy", *, parser: XMLParser | None = None,
                 system_prompt: str | None = "Answer with the number only, as <answer>NUMBER</answer>.",
                 test_fraction: float = 0.1, **kwargs):
        self.spec = spec_for(difficulty)
        self.test_fraction = test_fraction
        parser = parser or answer_parser()
        kwargs.setdefault("rubric", arithmetic_rubric(parser))
        super().__init__(parser=parser, system_prompt=system_prompt, **kwargs)

    def dataset(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """`n` (default `DEFAULT_ROWS`) distinct generated rows of "train" or "test", fixed by `seed`."""
        rows = generate_rows(lambda rng: make_problem(rng, self.spec), split,
                             DEFAULT_ROWS if n is None else n, seed, test_fraction=self.test_fraction)
        return [self._with_task(r) for r in rows]

    def gold_completion(self, row: Row) -> list[dict[str, str]]:
        values = {"answer": row["answer"]}
        if "think" in self.parser.fields:
            values["think"] = f"{row['info']['expression']} = {row['answer']}"
        return [{"role": "assistant", "content": self.parser.format(**values)}]
