"""Environments by name: `make_env("calculator", **kwargs)`.

A name is one registered with `register_env(name, factory)` (the built-in tasks are), or a
plug-in `"package.module:function"` whose function follows the verifiers convention
`load_environment(**kwargs) -> Environment`.

Also by name: "single_turn" (`single_turn_env`: a `SingleTurnEnv` over a configured dataset,
parser and rubric) and "group" (`group_env`: an `EnvGroup` of named envs with mixture weights).
`rubric_from_config` and `parser_from_config` build a rubric and a parser from config values
(docs/environments.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Mapping

from grpo_jax.envs import datasets
from grpo_jax.envs.base import SingleTurnEnv
from grpo_jax.envs.env_group import EnvGroup
from grpo_jax.rubrics import parsers
from grpo_jax.rubrics.rubric import Rubric


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
    "turn_bandit": _lazy("grpo_jax.envs.turn_bandit", "TurnBanditEnv"),
    "single_turn": lambda **kwargs: single_turn_env(**kwargs),
    "group": lambda **kwargs: group_env(**kwargs),
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


# -- parsers, rubrics and envs from config values ------------------------------------------------
PARSERS = {"answer": parsers.answer_parser, "think_answer": parsers.think_answer_parser}
# Reward function factories by name: text ones (grpo_jax.rubrics) get the env's parser when they
# take one; token ones (grpo_jax.rubrics.token_rewards, return a TokenReward) run on device.
TEXT_REWARDS = ("correct_answer", "format_reward", "overlong_penalty", "tool_used", "tool_calls_metric",
                "tool_errors_metric")
TOKEN_REWARDS = ("overlong_reward", "length_metric", "stop_token_reward", "pattern_reward")


def _plain(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value


def parser_from_config(spec: Any) -> parsers.XMLParser | None:
    """None -> None; "answer" | "think_answer" -> that parser; {"fields": [...], ...} -> `XMLParser(**spec)`."""
    spec = _plain(spec)
    if spec is None or isinstance(spec, parsers.XMLParser):
        return spec
    if isinstance(spec, str):
        if spec not in PARSERS:
            raise ValueError(f"parser {spec!r} is not one of {sorted(PARSERS)} (or a mapping of XMLParser "
                             "arguments)")
        return PARSERS[spec]()
    return parsers.XMLParser(**spec)


def reward_factory(name: str) -> tuple[Callable[..., Any], bool]:
    """(function, is_factory) of a reward name: a built-in factory or a "package.module:function"
    (itself a reward function; a factory when called with arguments, see `rubric_from_config`)."""
    if name in TEXT_REWARDS:
        return getattr(importlib.import_module("grpo_jax.rubrics.rewards"), name), True
    if name in TOKEN_REWARDS:
        return getattr(importlib.import_module("grpo_jax.rubrics.token_rewards"), name), True
    if ":" in name:
        module, _, function = name.partition(":")
        try:
            return getattr(importlib.import_module(module), function), False
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {name!r}: no function {function!r} in module {module!r} "
                             f"({type(e).__name__}: {e})") from e
    raise ValueError(f"reward {name!r} is not one of {TEXT_REWARDS + TOKEN_REWARDS} nor a "
                     "'package.module:function' (give it as {'fn': 'package.module:function', 'weight': w})")


def rubric_from_config(funcs: Mapping[str, Any], parser: Any = None, **rubric_kwargs) -> Rubric:
    """A `Rubric` from {metric name: weight | {"weight": w, "fn": name, **arguments}}.

    The function is `fn` (default: the metric name): a built-in factory (`TEXT_REWARDS`,
    `TOKEN_REWARDS`), called with the arguments (and `parser`, when it takes one), or a
    "package.module:function" used as the reward function itself, or called with the arguments
    as a factory when there are any. Weight 0 = logged metric only.
    """
    rubric = Rubric(parser=parser, **rubric_kwargs)
    for metric, spec in _plain(dict(funcs)).items():
        spec = dict(spec) if isinstance(spec, Mapping) else {"weight": spec}
        weight = float(spec.pop("weight", 1.0))
        fn, is_factory = reward_factory(spec.pop("fn", metric))
        if is_factory or spec:
            if parser is not None and "parser" in inspect.signature(fn).parameters:
                spec.setdefault("parser", parser)
            fn = fn(**spec, name=metric) if "name" in inspect.signature(fn).parameters else fn(**spec)
        if hasattr(fn, "fn") and hasattr(fn, "weight"):  # a TokenReward
            rubric.add_token_func(dataclasses.replace(fn, name=metric, weight=weight))
        else:
            rubric.add(fn, weight, metric)
    return rubric


def single_turn_env(dataset: Mapping[str, Any], *, rubric: Mapping[str, Any] | None = None,
                    parser: Any = "answer", system_prompt: str | None = None, name: str = "single_turn",
                    **kwargs) -> SingleTurnEnv:
    """A `SingleTurnEnv` over `dataset` (a `datasets` spec), scored by `rubric` ({name: weight ...},
    default correct_answer 1.0 + format_reward 0.2) with `parser`; its gold demonstration is the
    row's answer in the parser's format."""
    parser = parser_from_config(parser)
    funcs = rubric or {"correct_answer": 1.0, "format_reward": 0.2}
    return SingleTurnEnv(name=name, dataset_fn=datasets.dataset_from_config(dataset), parser=parser,
                         system_prompt=system_prompt, rubric=rubric_from_config(funcs, parser), **kwargs)


def group_env(envs: Mapping[str, Mapping[str, Any]]) -> EnvGroup:
    """An `EnvGroup` of {task: {"name": env name, "kwargs": {...}, "weight": share}} (weights are the
    proportions of the tasks' rows, default 1 each)."""
    built, weights = {}, {}
    for task, spec in _plain(dict(envs)).items():
        env = make_env(spec["name"], **dict(spec.get("kwargs") or {}))
        env.name = task
        built[task], weights[task] = env, float(spec.get("weight", 1.0))
    return EnvGroup(built, proportions=weights)
