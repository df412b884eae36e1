"""Small asyncio helpers shared by rubrics and environments.

`run_sync` runs a coroutine from sync code whether or not an event loop is running.
`call_in_daemon_thread` / `wait_in_daemon_thread` / `abandoned_threads` live in
`grpo_jax.guard` (re-exported here): the guard runs reward functions and tools, in killable
worker processes or in daemon threads.  Arbitrary model-written code belongs in the process
sandbox (`grpo_jax.envs.sandbox`).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable

from grpo_jax.guard import abandoned_threads, call_in_daemon_thread, wait_in_daemon_thread  # noqa: F401


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
