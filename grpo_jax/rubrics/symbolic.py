"""Symbolic equivalence of math answers with sympy, without ever calling `eval`.

Model output is untrusted, so `sympy.parse_expr` (which evaluates Python) is not used.
Instead a small LaTeX-to-Python normalisation is followed by Python's `ast` parser and an
explicit walk that only accepts numbers, single-letter symbols, `pi`, `e`, the operators
+ - * / ** and a few named functions, building the sympy expression node by node.  Sizes
are bounded (text length, node count, numeric exponents) so no answer can make the check
run for long.  Two answers are equal when `simplify(a - b) == 0`.
"""

from __future__ import annotations

import ast
import functools
import re

MAX_TEXT_CHARS = 200
MAX_NODES = 100
MAX_ABS_EXPONENT = 100
MAX_RESULT_DIGITS = 1000  # decimal digits of a numeric power

_LATEX_REPLACEMENTS = (
    (r"\left", ""), (r"\right", ""), (r"\cdot", "*"), (r"\times", "*"), (r"\div", "/"),
    (r"\pi", " pi "), ("^", "**"), (r"\!", ""), (r"\,", ""), ("$", ""), ("{", "("), ("}", ")"),
)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SQRT_RE = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_FUNC_RE = re.compile(r"\\(sin|cos|tan|log|ln|exp)\b")
# Implicit multiplication: "2x", "2(x+1)", ")(", ")x".
_IMPLICIT_MUL_RE = re.compile(r"(?<=[\d)])\s*(?=[a-zA-Z(])")
_FUNCTIONS = ("sqrt", "sin", "cos", "tan", "log", "ln", "exp", "abs")


def _normalise(text: str) -> str:
    text = text.strip().rstrip(".")
    text = re.sub(r"\\boxed\s*\{(.*)\}", r"\1", text)
    for _ in range(3):  # nested \frac{\frac{..}{..}}{..} unwrap from the inside out
        text = _FRAC_RE.sub(r"((\1)/(\2))", text)
        text = _SQRT_RE.sub(r"sqrt(\1)", text)
    text = _FUNC_RE.sub(r"\1", text)
    for old, new in _LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    # Insert '*' for implicit products, but not inside function names like "sqrt(".
    text = _IMPLICIT_MUL_RE.sub("*", text)
    for name in _FUNCTIONS:
        text = text.replace(f"{name}*(", f"{name}(")
    return text


class _Builder:
    """Turns an accepted Python AST into a sympy expression, refusing everything else."""

    def __init__(self, sympy):
        self.sp = sympy
        self.nodes = 0
        self.functions = {"sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos,
                          "tan": sympy.tan, "log": sympy.log, "ln": sympy.log,
                          "exp": sympy.exp, "abs": sympy.Abs}

    def build(self, node):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ValueError("expression too large")
        sp = self.sp
        if isinstance(node, ast.Expression):
            return self.build(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return sp.Rational(repr(node.value)) if isinstance(node.value, float) else sp.Integer(node.value)
        if isinstance(node, ast.Name):
            if node.id == "pi":
                return sp.pi
            if node.id == "e":
                return sp.E
            if len(node.id) == 1 and node.id.isalpha():
                return sp.Symbol(node.id)
            raise ValueError(f"unknown name {node.id!r}")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            operand = self.build(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            left, right = self.build(node.left), self.build(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if isinstance(node.op, ast.Div):
                return left / right
            if isinstance(node.op, ast.Pow):
                if right.is_number and abs(float(right)) > MAX_ABS_EXPONENT:
                    raise ValueError("exponent too large")
                if (right.is_number and left.is_number and left != 0
                        and abs(float(right)) * abs(float(sp.log(abs(left), 10))) > MAX_RESULT_DIGITS):
                    raise ValueError("power too large")
                return left ** right
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in self.functions and len(node.args) == 1 and not node.keywords):
            return self.functions[node.func.id](self.build(node.args[0]))
        raise ValueError(f"unsupported syntax: {type(node).__name__}")


def to_sympy(text: str):
    """The sympy expression for a math answer string, or None if it is not a safe expression."""
    if text is None or len(text) > MAX_TEXT_CHARS:
        return None
    import sympy
    try:
        tree = ast.parse(_normalise(text), mode="eval")
        return _Builder(sympy).build(tree)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, RecursionError, OverflowError):
        return None


@functools.lru_cache(maxsize=4096)
def symbolic_equal(a: str, b: str) -> bool:
    """Whether two answer strings are the same mathematical expression (simplify(a - b) == 0)."""
    import sympy
    expr_a, expr_b = to_sympy(a), to_sympy(b)
    if expr_a is None or expr_b is None:
        return False
    try:
        return bool(sympy.simplify(expr_a - expr_b) == 0)
    except Exception:  # sympy raises many types on odd input; an undecidable pair is unequal
        return False
