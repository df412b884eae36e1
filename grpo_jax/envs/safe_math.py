"""Safe evaluation of arithmetic expressions (no `eval`): an AST walk over numbers and operators.

Accepted: int and decimal literals, parentheses, unary + and -, and the binary operators
+ - * / // % ** (a subset may be required with `ops`).  Values are exact `Fraction`s.  Sizes
are bounded so no input can make the evaluation slow or huge: the text length, the size of
every intermediate value (`max_abs`), and the exponent of `**` (an integer, at most
`MAX_EXPONENT`, with a result within `max_abs`).  "×", "÷" and "^" are read as *, / and **.
Every refusal is an `ExpressionError` (a ValueError) with a message fit for the model.
"""

from __future__ import annotations

import ast
import math
from fractions import Fraction
from typing import Iterable

MAX_CHARS = 200
MAX_ABS = 10 ** 30
MAX_EXPONENT = 64
ALL_OPS = ("+", "-", "*", "/", "//", "%", "**")

_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.Pow: "**"}


class ExpressionError(ValueError):
    """The expression is malformed, uses something not allowed, or is too large."""


def _check_size(value: Fraction, max_abs: int) -> Fraction:
    if abs(value) > max_abs or value.denominator > max_abs:
        raise ExpressionError("number too large")
    return value


def _power(base: Fraction, exponent: Fraction, max_abs: int) -> Fraction:
    if exponent.denominator != 1:
        raise ExpressionError("only integer exponents are supported")
    e = exponent.numerator
    if abs(e) > MAX_EXPONENT:
        raise ExpressionError(f"exponent larger than {MAX_EXPONENT}")
    if base == 0 and e < 0:
        raise ExpressionError("division by zero")
    # Refuse before computing: log10 of the result would pass log10(max_abs).
    for part in (abs(base.numerator), base.denominator):
        if part > 1 and abs(e) * math.log10(part) > math.log10(max_abs):
            raise ExpressionError("number too large")
    return base ** e


def _evaluate(node: ast.AST, ops: frozenset[str], max_abs: int, literals: list[Fraction], unary: bool) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, ops, max_abs, literals, unary)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        literals.append(value)
        return _check_size(value, max_abs)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)) and unary:
        value = _evaluate(node.operand, ops, max_abs, literals, unary)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        op = _BINARY[type(node.op)]
        if op not in ops:
            raise ExpressionError(f"operator {op} is not allowed")
        left = _evaluate(node.left, ops, max_abs, literals, unary)
        right = _evaluate(node.right, ops, max_abs, literals, unary)
        if op in ("/", "//", "%") and right == 0:
            raise ExpressionError("division by zero")
        if op == "**":
            result = _power(left, right, max_abs)
        elif op == "+":
            result = left + right
        elif op == "-":
            result = left - right
        elif op == "*":
            result = left * right
        elif op == "/":
            result = left / right
        elif op == "//":
            result = Fraction(left // right)
        else:
            result = left % right
        return _check_size(result, max_abs)
    raise ExpressionError(f"unsupported syntax ({type(node).__name__})")


def parse_and_evaluate(expression: str, *, ops: Iterable[str] = ALL_OPS, max_abs: int = MAX_ABS,
                       unary: bool = True) -> tuple[Fraction, list[Fraction]]:
    """(exact value, the number literals in order of appearance) of an arithmetic expression."""
    if not isinstance(expression, str):
        raise ExpressionError("the expression must be a string")
    if len(expression) > MAX_CHARS:
        raise ExpressionError(f"expression longer than {MAX_CHARS} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").strip()
    if not text:
        raise ExpressionError("empty expression")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ExpressionError(f"invalid expression: {getattr(e, 'msg', e)}") from None
    literals: list[Fraction] = []
    try:
        value = _evaluate(tree, frozenset(ops), max_abs, literals, unary)
    except RecursionError:
        raise ExpressionError("expression nested too deeply") from None
    return value, literals


def evaluate(expression: str, **kwargs) -> Fraction:
    """The exact value of an arithmetic expression (see `parse_and_evaluate`)."""
    return parse_and_evaluate(expression, **kwargs)[0]
