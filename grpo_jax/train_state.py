"""The GRPO train state, created already sharded: `TrainState`, `init_train_state`, and the
`NamedSharding`s of its leaves (`train_state_shardings`) that the train step is compiled with.

Sharded creation follows the `eval_shape -> shardings -> jit(init, out_shardings=...)` pattern:
the abstract optimizer state gives the shardings, and the jitted init writes every leaf straight
into its shard.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from grpo_jax import sharding as sharding_lib
from grpo_jax.models.lora import trainable
from grpo_jax.utils import is_var


class TrainState(NamedTuple):
    """Everything the step updates. `params` is the `nnx.State` of the model's `nnx.Param`s."""

    params: Any
    opt_state: Any
    step: jax.Array   # int32 scalar: train steps taken
    key: jax.Array    # root key; per-step randomness is fold_in(key, step)


def split_params(model: nnx.Module, which=None):
    """`(graphdef, params, rest)` with `params` what the step trains: the `nnx.Param` state, or
    the LoRA adapters alone when the model has them (`models.lora.trainable`; the base weights
    are then in `rest`, frozen). `which`: another `nnx` filter (e.g. `models.lora.BASE`)."""
    return nnx.split(model, which or trainable(model), ...)


def _replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def _tree_shardings(tree, mesh, rules):
    """Variables by their logical axes; any other leaf (counts, keys, scalars) replicated."""
    def one(x):
        if is_var(x):
            return sharding_lib.named_sharding(mesh, sharding_lib.logical_axes_of(x), x.shape, rules)
        return _replicated(mesh)
    return jax.tree.map(one, tree, is_leaf=is_var)


def train_state_shardings(model: nnx.Module, optimizer: optax.GradientTransformation, mesh,
                          rules=sharding_lib.DEFAULT_RULES) -> TrainState:
    """A `TrainState` of `NamedSharding`s: parameters and optimizer moments by logical axes.

    `model` may be abstract (`grpo_jax.models.abstract_model`). The optimizer state inherits the
    parameters' `nnx.Param` wrappers (optax maps over their values), so its moments carry the
    same logical axes and shard like the parameters.
    """
    _, params, _ = split_params(model)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    return TrainState(params=_tree_shardings(params, mesh, rules),
                      opt_state=_tree_shardings(abstract_opt, mesh, rules),
                      step=_replicated(mesh), key=_replicated(mesh))


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, key, *,
                     mesh=None, rules=sharding_lib.DEFAULT_RULES, which=None) -> TrainState:
    """The initial state, born sharded on `mesh` (optimizer state created by a jitted init).

    The state holds a copy of the model's parameters: the step donates (frees) the state's
    buffers, and `model` stays usable. The policy after some steps is
    `nnx.merge(graphdef, state.params, rest)` (`split_params`; `which`: its filter).
    """
    _, params, _ = split_params(model, which)
    if mesh is None:
        return _init_state(optimizer, params, key)
    shardings = train_state_shardings(model, optimizer, mesh, rules)
    init = jax.jit(_init_state.__wrapped__, static_argnums=0, out_shardings=shardings)
    return init(optimizer, jax.device_put(params, shardings.params), key)


@functools.partial(jax.jit, static_argnums=0)
def _init_state(optimizer, params, key) -> TrainState:
    # The outputs of a jit are new buffers: the state owns a copy of the parameters.
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), key)
