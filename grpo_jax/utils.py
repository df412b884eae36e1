"""Helpers shared across the package: the bottom of the import order (nothing from grpo_jax).

Importing this module loads numpy only; `is_var` loads flax on its first call, so the pure
modules that use the rest (`rubrics`, `envs`) stay free of jax.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from typing import Any, Awaitable, Callable, Mapping

import numpy as np


# -- errors -----------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A config (experiment or model) that cannot run; the message names the field."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, restored or matched to the model; the message says which
    step, tensor or field."""


# -- numbers ----------------------------------------------------------------------------------
def round_up(x: int, multiple: int) -> int:
    """The least multiple of `multiple` that is >= x."""
    return int(math.ceil(x / multiple) * multiple)


def nan_mean(values) -> float:
    """Mean of the non-NaN entries (NaN when there are none), without numpy's empty-slice warning."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


# -- configs ----------------------------------------------------------------------------------
def dataclass_from(cls, config: Any, *, what: str, error: type[Exception] = ValueError):
    """`config` as a `cls` (a dataclass): itself, or built from a dict or `ConfigDict` holding a
    subset of its fields. Raises `error` naming `what` for anything else or an unknown field."""
    if isinstance(config, cls):
        return config
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise error(f"{what} must be a {cls.__name__} or a mapping, got {type(config)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise error(f"{what}: unknown fields {unknown}; known: {sorted(names)}")
    return cls(**dict(config))


# -- trees of NNX state -----------------------------------------------------------------------
def is_var(x) -> bool:
    """Whether `x` is an `nnx.Variable`: the `is_leaf` of tree maps over NNX state."""
    from flax import nnx  # jax loads with the first tree walk, not with this module
    return isinstance(x, nnx.Variable)


def path_name(path) -> str:
    """A tree path (`tree_flatten_with_path`) as "layers/attn/w_q"."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


# -- async ------------------------------------------------------------------------------------
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
