"""Small asyncio helpers shared by rubrics and environments.

`run_sync` runs a coroutine from sync code whether or not an event loop is running.
`call_in_daemon_thread` runs a blocking call in its own daemon thread and returns an
awaitable, so `asyncio.wait_for` can give up on it: a Python thread cannot be killed, so
a call that never returns is abandoned (it no longer blocks the caller, `asyncio.run`'s
executor shutdown, or interpreter exit) and counted in `abandoned_threads()`.  Arbitrary
model-written code belongs in the process sandbox (`grpo_jax.envs.sandbox`), which can be
killed; this is for trusted Python functions that may still hang or be slow.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable

_abandoned_lock = threading.Lock()
_abandoned = 0


def abandoned_threads() -> int:
    """How many timed-out calls were left running in background threads so far."""
    return _abandoned


def _count_abandoned():
    global _abandoned
    with _abandoned_lock:
        _abandoned += 1


def run_sync(awaitable_factory: Callable[[], Awaitable[Any]]) -> Any:
    """Run `awaitable_factory()` to completion from sync code, inside or outside an event loop.

    Outside a running loop this is `asyncio.run`; inside one (a notebook, an async caller)
    the coroutine runs on a fresh loop in a helper thread, so the caller's loop is not
    re-entered.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(awaitable_factory())
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = asyncio.run(awaitable_factory())
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def call_in_daemon_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "asyncio.Future[Any]":
    """A future (on the running loop) for `fn(*args, **kwargs)` run in a new daemon thread."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value, error):
        if future.done():  # the waiter gave up (timed out / cancelled)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def target():
        value, error = None, None
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:  # handed to the awaiting coroutine
            error = e
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop closed while the call ran
            pass

    threading.Thread(target=target, daemon=True, name=f"call-{getattr(fn, '__name__', 'fn')}").start()
    return future


async def wait_in_daemon_thread(timeout_s: float | None, fn: Callable[..., Any], *args: Any,
                                **kwargs: Any) -> Any:
    """`await` `fn(*args, **kwargs)` in a daemon thread; `asyncio.TimeoutError` after `timeout_s`."""
    future = call_in_daemon_thread(fn, *args, **kwargs)
    try:
        return await asyncio.wait_for(future, timeout_s)
    except asyncio.TimeoutError:
        _count_abandoned()
        raise
