"""Thread mode and async functions: daemon threads, and prints routed per call by a context variable."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import io
import logging
import sys
import threading
from typing import Any, Callable

from grpo_jax.guard.outcome import (Outcome, abandoned_threads, bound, call_bounded, count, describe,
                                    timed_out)

log = logging.getLogger("grpo_jax.guard")


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
        except BaseException as e:  # noqa: B036 - handed to the awaiting coroutine
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
        count("guard/abandoned_threads")
        raise


class _BoundedBuffer:
    """Keeps the first `limit` characters written and counts the rest."""

    def __init__(self, limit: int):
        self.limit, self.parts, self.kept, self.total = limit, [], 0, 0

    def write(self, text: str) -> int:
        n = len(text)
        self.total += n
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(text[:room])
            self.kept += min(n, room)
        return n

    def getvalue(self) -> str:
        return "".join(self.parts)


_sink: contextvars.ContextVar[_BoundedBuffer | None] = contextvars.ContextVar("grpo_guard_sink", default=None)
_install_lock = threading.Lock()


class _RoutedStream(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr: code running under a guard (a guarded thread, or
    an async function's task) writes into its own bounded buffer, everything else to the
    original stream."""

    def __init__(self, target):
        self._target = target

    def write(self, text):
        buffer = _sink.get()
        return buffer.write(str(text)) if buffer is not None else self._target.write(text)

    def flush(self):
        if _sink.get() is None:
            self._target.flush()

    def __getattr__(self, name):  # encoding, fileno, isatty ... of the real stream
        return getattr(self._target, name)


def _install_routing():
    with _install_lock:
        if not isinstance(sys.stdout, _RoutedStream):
            sys.stdout = _RoutedStream(sys.stdout)
        if not isinstance(sys.stderr, _RoutedStream):
            sys.stderr = _RoutedStream(sys.stderr)


def _run_here(fn, kwargs, convert, limit) -> Outcome:
    """`fn(**kwargs)` in this thread, prints captured; every exception becomes the outcome."""
    buffer = _BoundedBuffer(limit + 1)
    token = _sink.set(buffer)
    try:
        value, value_chars, kind, error = call_bounded(fn, kwargs, convert, limit)
    finally:
        _sink.reset(token)
    return Outcome(value, error, kind, buffer.getvalue(), buffer.total, value_chars)


async def in_thread(fn, kwargs, convert, timeout_s, limit, name) -> Outcome:
    _install_routing()
    try:
        return await wait_in_daemon_thread(timeout_s, _run_here, fn, kwargs, convert, limit)
    except asyncio.TimeoutError:
        log.warning("%s timed out after %g s; its thread keeps running (threads cannot be killed; "
                    "%d abandoned so far): use isolation='process' for code that can hang",
                    name, timeout_s, abandoned_threads())
        return timed_out(timeout_s)


def _outer_cancel() -> bool:
    """Whether the running task itself is being cancelled (not a CancelledError raised by `fn`)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return task is None or cancelling is None or cancelling() > 0


async def in_loop(fn, kwargs, convert, timeout_s, limit) -> Outcome:
    _install_routing()
    buffer = _BoundedBuffer(limit + 1)

    async def body():  # catches inside the task: a task re-raises SystemExit out of the event loop
        token = _sink.set(buffer)
        try:
            value = await fn(**kwargs)
            return None, convert(value) if convert is not None else value
        except (KeyboardInterrupt, asyncio.CancelledError):
            raise
        except BaseException as e:  # noqa: B036
            return describe(e), None
        finally:
            _sink.reset(token)

    try:
        error, value = await asyncio.wait_for(body(), timeout_s)
    except asyncio.TimeoutError:
        return dataclasses.replace(timed_out(timeout_s), output=buffer.getvalue(), output_chars=buffer.total)
    except asyncio.CancelledError as e:
        if _outer_cancel():
            raise
        error, value = describe(e), None
    if error is not None:
        return Outcome(None, error, "exception", buffer.getvalue(), buffer.total)
    value, value_chars = bound(value, limit)
    return Outcome(value, None, None, buffer.getvalue(), buffer.total, value_chars)
