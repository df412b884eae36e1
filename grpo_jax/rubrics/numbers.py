"""Numeric answer matching: normalised numbers, GSM8K answers, and math equivalence.

Model answers arrive as free text ("$1,234", "72.", "3/4", "\\boxed{72}", "72 dollars").
`parse_number` turns such a string into an exact `fractions.Fraction` when it holds exactly
one number, and into `None` otherwise: a string with several numbers ("71 or 72", a wall of
digits with spaces) is not an answer, so answer spam can never match.  Comparisons are exact
on fractions (decimal strings are converted exactly, "0.1" is 1/10), with an optional relative
tolerance for answers given as rounded decimals.

`math_equal` adds symbolic equivalence (via `grpo_jax.rubrics.symbolic`) for answers that
are expressions ("\\frac{1}{2}", "2\\sqrt{2}"); it is off by default because for arithmetic
tasks an unevaluated expression ("347*29") must not count as the number.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number token: optional sign, digits with optional thousands commas, optional decimals,
# optional exponent, optionally followed by "/ denominator" for a plain fraction.  It must
# stand alone: not glued to letters or other digits ("2x", "5cm" are not numbers here).
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_DEC = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_EXP = r"(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\w.])([-+−]?)\s*({_DEC}{_EXP})(?:\s*/\s*(\d+))?(?!\w|\.\d)")
# Text around the number that makes it part of an expression rather than an answer ("x^2", "2+3").
_MATH_AROUND_RE = re.compile(r"[\d^*/=()\[\]{}<>+\\]")
MAX_EXPONENT = 1000  # "1e999999999" would allocate a giant integer
_FRAC_LATEX_RE = re.compile(r"\\d?frac\s*\{\s*([^{}]*)\s*\}\s*\{\s*([^{}]*)\s*\}")
_BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")
# Longest digit run accepted as one number: longer runs are walls of digits, not answers.
MAX_NUMBER_CHARS = 64


def _clean(text: str) -> str:
    text = _BOXED_RE.sub(r"\1", text)
    text = _FRAC_LATEX_RE.sub(r"\1/\2", text)
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\ ", "\\text", "\\mathrm"):
        text = text.replace(junk, " " if junk in ("\\,", "\\ ") else "")
    return text.strip().rstrip(".").strip()


def parse_number(text: str | None) -> Fraction | None:
    """The exact value of the single number in `text`, or None.

    None when `text` is None/empty, holds no number or more than one, the number is longer
    than `MAX_NUMBER_CHARS` characters or has an exponent beyond `MAX_EXPONENT`, or the text
    around it looks like math ("x^2", "(3)", "= 5"): words around the number are fine
    ("72 dollars", "The answer is 72.").
    """
    if text is None:
        return None
    cleaned = _clean(str(text))
    matches = list(_NUMBER_RE.finditer(cleaned))
    if len(matches) != 1:
        return None
    match = matches[0]
    if _MATH_AROUND_RE.search(cleaned[:match.start()] + " " + cleaned[match.end():]):
        return None
    sign, body, denominator = match.groups()
    exponent = re.search(r"[eE]([-+]?\d+)$", body)
    if len(body) > MAX_NUMBER_CHARS or (exponent and abs(int(exponent.group(1))) > MAX_EXPONENT):
        return None
    value = Fraction(body.replace(",", ""))
    if denominator is not None:
        if int(denominator) == 0:
            return None
        value /= int(denominator)
    return -value if sign in ("-", "−") else value


def numbers_equal(a: Fraction | None, b: Fraction | None, rel_tol: float = 0.0) -> bool:
    """Exact equality of two parsed numbers, or |a-b| <= rel_tol * max(|a|,|b|) when rel_tol > 0."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    if rel_tol <= 0:
        return False
    return abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))


def math_equal(predicted: str | None, gold: str | None, *, rel_tol: float = 0.0,
               symbolic: bool = False) -> bool:
    """Whether a predicted answer string equals the gold answer string.

    First as numbers (`parse_number` on both, exact or within `rel_tol`); then, when
    `symbolic` is set, as sympy expressions (`grpo_jax.rubrics.symbolic.symbolic_equal`).
    """
    if predicted is None or gold is None:
        return False
    pred_num, gold_num = parse_number(predicted), parse_number(gold)
    if pred_num is not None and gold_num is not None:
        return numbers_equal(pred_num, gold_num, rel_tol)
    if symbolic:
        from grpo_jax.rubrics.symbolic import symbolic_equal  # sympy is slow to import
        return symbolic_equal(predicted, gold)
    return False


def extract_gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution ("... #### 1,234" -> "1234").

    GSM8K solutions end with a line "#### <answer>" (Cobbe et al. 2021); the answer is
    the text after the last "####", with thousands commas removed.
    """
    if "####" not in solution:
        raise ValueError(f"not a GSM8K solution (no '####'): {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def format_number(value: Fraction | int, max_decimals: int = 6) -> str:
    """Canonical text of a number: integers as "123", others as a decimal ("3.5", "0.333333")."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.{max_decimals}f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"
