"""Environments by name: `make_env("calculator", **kwargs)`.

A name is one registered with `register_env(name, factory)` (the built-in tasks are), or a
plug-in `"package.module:function"` whose function follows the verifiers convention
`load_environment(**kwargs) -> Environment`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def _lazy(module: str, cls: str) -> Callable[..., Any]:
    """A factory importing `module` on use (gsm8k loads tensorflow_datasets)."""
    def factory(**kwargs):
        return getattr(importlib.import_module(module), cls)(**kwargs)
    return factory


_FACTORIES: dict[str, Callable[..., Any]] = {
    "calculator": _lazy("grpo_jax.envs.calculator", "CalculatorEnv"),
    "arithmetic": _lazy("grpo_jax.envs.arithmetic", "ArithmeticEnv"),
    "countdown": _lazy("grpo_jax.envs.countdown", "CountdownEnv"),
    "gsm8k": _lazy("grpo_jax.envs.gsm8k", "GSM8KEnv"),
}


def register_env(name: str, factory: Callable[..., Any]) -> None:
    """Makes `env.name = name` build `factory(**env.kwargs)`."""
    if ":" in name:
        raise ValueError(f"env name {name!r}: ':' is reserved for 'package.module:function' plug-ins")
    _FACTORIES[name] = factory


def registered_names() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def find_factory(name: str) -> Callable[..., Any]:
    """The factory of `name`; `ValueError` listing the registered names when there is none."""
    if name in _FACTORIES:
        return _FACTORIES[name]
    if ":" in name:
        module, _, function = name.partition(":")
        try:
            return getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{name!r}: no function {function!r} in module {module!r} "
                             f"({type(e).__name__}: {e})") from e
    raise ValueError(f"{name!r} is not a registered env ({', '.join(_FACTORIES)}) nor a "
                     "'package.module:function' plug-in")


def make_env(name: str, **kwargs):
    """The environment `name` (registered or plug-in) built with `kwargs`."""
    return find_factory(name)(**kwargs)
