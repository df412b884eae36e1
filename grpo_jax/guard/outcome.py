"""What a guarded call returns (`Outcome`), the checks of the knobs, and the guard's counters."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import threading
from typing import Any, Callable

DEFAULT_TIMEOUT_S = 30.0
ISOLATIONS = ("process", "thread")
KINDS = ("exception", "timeout", "crashed")  # Outcome.kind of a failure


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one guarded call.

    value:        `convert(fn(**kwargs))` on success (a `str` cut to max_output_chars + 1).
    error:        "TypeName: message" of a failure, else None.
    kind:         None on success, else one of `KINDS`.
    output:       captured stdout + stderr, at most max_output_chars + 1 characters.
    output_chars: how much was written in all (characters; bytes in process mode).
    value_chars:  length of a `str` value before it was cut, else 0.
    """
    value: Any = None
    error: str | None = None
    kind: str | None = None
    output: str = ""
    output_chars: int = 0
    value_chars: int = 0

    @property
    def ok(self) -> bool:
        return self.kind is None


def check_timeout(timeout_s: Any, what: str = "timeout_s") -> float:
    """`timeout_s` as a float; a ValueError unless it is a finite number of seconds > 0."""
    if (isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real)
            or not 0 < float(timeout_s) < math.inf):
        raise ValueError(f"{what} must be a finite number of seconds > 0, got {timeout_s!r}: "
                         "a call without a time limit can hang training forever")
    return float(timeout_s)


def check_isolation(isolation: str, what: str = "isolation") -> str:
    if isolation not in ISOLATIONS:
        raise ValueError(f"{what} must be one of {ISOLATIONS}, got {isolation!r}")
    return isolation


def is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def describe(error: BaseException) -> str:
    """"TypeName: message" of an exception, even when its `str` raises."""
    try:
        message = str(error)
    except BaseException:  # noqa: B036 - a hostile __str__ must not escape either
        message = "<str() of the exception raised>"
    name = type(error).__name__
    return f"{name}: {message[:500]}" if message else name


def bound(value: Any, limit: int) -> tuple[Any, int]:
    if isinstance(value, str):
        return value[:limit + 1], len(value)
    return value, 0


def call_bounded(fn: Callable[..., Any], kwargs, convert, limit: int) -> tuple[Any, int, str | None, str | None]:
    """`(value, value_chars, kind, error)` of `convert(fn(**kwargs))`, a string value cut to
    `limit` + 1 characters; every exception of the function (SystemExit & co. too) becomes
    kind "exception" with its description."""
    try:
        value = fn(**kwargs)
        if convert is not None:
            value = convert(value)
        value, value_chars = bound(value, limit)
        return value, value_chars, None, None
    except BaseException as e:  # noqa: B036 - SystemExit, KeyboardInterrupt ... of the function
        return None, 0, "exception", describe(e)


def timed_out(timeout_s: float, note: str = "") -> Outcome:
    return Outcome(error=f"TimeoutError: timed out after {timeout_s:g} s{note}", kind="timeout")


class Breaker:
    """Counts the time-outs of one `guarded_map`; past `limit` its calls not yet started fail at once."""

    def __init__(self, limit: int | None):
        self.limit, self.timeouts, self._lock = limit, 0, threading.Lock()

    def add(self, outcome: Outcome) -> Outcome:
        if outcome.kind == "timeout":
            with self._lock:
                self.timeouts += 1
        return outcome

    def skipped(self) -> Outcome | None:
        if self.limit is None or self.timeouts < self.limit:
            return None
        return Outcome(error=f"TimeoutError: not run: {self.timeouts} calls of this batch timed out already",
                       kind="timeout")


_counts_lock = threading.Lock()
_counts = {"guard/abandoned_threads": 0, "guard/killed_workers": 0, "guard/crashed_workers": 0,
           "guard/started_workers": 0}


def count(key: str):
    with _counts_lock:
        _counts[key] += 1


def stats() -> dict[str, int]:
    """Counters since start: threads abandoned on time-out, workers started / killed / crashed."""
    with _counts_lock:
        return dict(_counts)


def abandoned_threads() -> int:
    """How many timed-out calls were left running in background threads so far."""
    return stats()["guard/abandoned_threads"]
