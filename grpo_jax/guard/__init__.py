"""One guard for the user code the trainer calls: reward functions and tools.

`await guarded_call(fn, kwargs, timeout_s=..., isolation=...)` runs `fn(**kwargs)` and returns
an `Outcome`; it never raises because of `fn`.  Callers turn a failed outcome into a counted
NaN (`Rubric`) or an error message to the model (`execute_tool_call`).

Guarantees, for every isolation mode:
  * Whatever `fn` raises becomes a failed outcome ("exception"): `SystemExit` (`sys.exit()`),
    `GeneratorExit`, `KeyboardInterrupt` raised by `fn` itself, and errors in `convert` (e.g. a
    result whose `repr` raises) or in `str` of the exception.  A real Ctrl-C is delivered to the
    main thread, which only waits on `fn`, so it still stops the run (async functions: it
    propagates).
  * A time limit: `timeout_s` must be finite and > 0 (`check_timeout`); `DEFAULT_TIMEOUT_S`
    is 30 s.  Past it the outcome is "timeout".  In a batch (`guarded_map`), after 3 time-outs
    the calls not yet started fail at once, so a function hanging on every input cannot hold
    a batch for one time limit per call.
  * What `fn` prints is captured (the first `max_output_chars` characters, and a count), never
    shown on the trainer's console; a `str` result is cut to the same size.

Isolation of plain (sync) functions:
  "process"  `fn` runs in a worker process forked from this one (`WorkerPool`, a few persistent
             workers; a fork is ~ms, a call ~0.05-0.1 ms).  Forking inherits the function, so lambdas
             and closures work; only the arguments and the result are pickled.  A call past its
             time limit gets its worker (and the worker's process group) SIGKILLed; a worker that
             dies (`os._exit`, a segfault) is "crashed".  Output is captured at the file
             descriptors (fds 1 and 2), so `os.write(1, ...)`, C extensions and `fn`'s own threads
             are captured too.  Side effects (appending to a list, counters, caches) stay in the
             worker.  The workers run plain Python only: JAX state of the parent must not be used
             in `fn` (a forked child using the parent's JAX runtime may deadlock; the time limit
             then kills it).  Arguments that cannot be pickled fall back to "thread", logged once.
  "thread"   `fn` runs in a daemon thread of this process: side effects are kept, but a call past
             its limit cannot be stopped (Python threads cannot be killed); it is abandoned and
             counted (`stats()["guard/abandoned_threads"]`).  Prints through `sys.stdout` /
             `sys.stderr` of that thread are captured; `os.write(1, ...)` and prints of threads
             `fn` starts are not.
Async functions (`async def`) always run on the caller's event loop, cancelled at the time
limit; one that blocks the loop without awaiting cannot be interrupted, and a `SystemExit`
raised in a task it starts itself leaves the event loop (asyncio re-raises it); its own
`sys.exit()` is caught.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Mapping, Sequence

from grpo_jax.guard.outcome import (DEFAULT_TIMEOUT_S, ISOLATIONS, KINDS, Breaker, Outcome, abandoned_threads,
                                    check_isolation, check_timeout, describe, is_async, stats)
from grpo_jax.guard.threads import call_in_daemon_thread, in_loop, in_thread, wait_in_daemon_thread
from grpo_jax.guard.workers import WorkerPool, can_fork, configure_pool, default_pool

__all__ = ["DEFAULT_TIMEOUT_S", "ISOLATIONS", "KINDS", "Outcome", "guarded_call", "guarded_map", "check_timeout",
           "check_isolation", "describe", "is_async", "stats", "abandoned_threads", "call_in_daemon_thread",
           "wait_in_daemon_thread", "WorkerPool", "default_pool", "configure_pool"]

log = logging.getLogger(__name__)
_fallback_warned: set[str] = set()


async def guarded_call(fn: Callable[..., Any], kwargs: Mapping[str, Any], *,
                       timeout_s: float = DEFAULT_TIMEOUT_S, isolation: str = "process",
                       convert: Callable[[Any], Any] | None = None, max_output_chars: int = 2000,
                       name: str | None = None) -> Outcome:
    """Run `fn(**kwargs)` (sync or async) under the guard (see the module docstring).

    `convert(value)` runs inside the guard on the return value (e.g. `repr` of a tool's result,
    a float check of a reward), so its failures are the call's failures; it must be a function
    defined at module level (it keys the worker's job table with `fn`).  Never raises, except
    for a real Ctrl-C or the cancellation of the awaiting task.
    """
    (outcome,) = await guarded_map(fn, [kwargs], timeout_s=timeout_s, isolation=isolation, convert=convert,
                                   max_output_chars=max_output_chars, name=name)
    return outcome


async def guarded_map(fn: Callable[..., Any], kwargs_list: Sequence[Mapping[str, Any]], *,
                      timeout_s: float = DEFAULT_TIMEOUT_S, isolation: str = "process",
                      convert: Callable[[Any], Any] | None = None, max_output_chars: int = 2000,
                      name: str | None = None, max_concurrency: int = 64,
                      max_timeouts: int | None = 3) -> list[Outcome]:
    """`guarded_call` of `fn` on each kwargs of `kwargs_list`, concurrently: one `Outcome` each.

    Each call has its own time limit.  Async functions and "thread" mode run at most
    `max_concurrency` calls at once; "process" mode as many as there are workers.  Once
    `max_timeouts` calls have timed out, the calls not yet started fail at once ("timeout"):
    a function that hangs on every input costs a batch about one time limit per worker, not
    one per call.  None: no such limit.
    """
    timeout_s = check_timeout(timeout_s)
    check_isolation(isolation)
    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    outcomes: list[Outcome | None] = [None] * len(kwargs_list)
    breaker = Breaker(max_timeouts)
    try:
        if not is_async(fn) and isolation == "process" and can_fork() and kwargs_list:
            outcomes, why = await default_pool().call_many(fn, kwargs_list, convert=convert, timeout_s=timeout_s,
                                                           limit=max_output_chars, breaker=breaker)
            if why is not None and name not in _fallback_warned:
                _fallback_warned.add(name)
                log.warning("%s cannot run in a worker process (%s); running it in a thread instead", name, why)
        semaphore = asyncio.Semaphore(max_concurrency)

        async def one(kwargs):
            async with semaphore:
                if skipped := breaker.skipped():
                    return skipped
                if is_async(fn):
                    return breaker.add(await in_loop(fn, kwargs, convert, timeout_s, max_output_chars))
                return breaker.add(await in_thread(fn, kwargs, convert, timeout_s, max_output_chars, name))

        missing = [i for i, o in enumerate(outcomes) if o is None]
        for i, outcome in zip(missing, await asyncio.gather(*(one(kwargs_list[i]) for i in missing))):
            outcomes[i] = outcome
        return outcomes
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise
    except BaseException as e:  # noqa: B036 - a failure of the guard itself, still not the caller's
        failed = Outcome(error=f"guard failed: {describe(e)}", kind="exception")
        return [o if o is not None else failed for o in outcomes]
