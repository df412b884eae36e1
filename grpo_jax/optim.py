"""Optimizer for the train step: global-norm clipping + AdamW with a learning-rate schedule.

`make_optimizer` returns one `optax.GradientTransformation`:

    float32_state(
        chain(clip_by_global_norm(max_grad_norm),        # skipped when max_grad_norm is None
              inject_hyperparams(adamw)(learning_rate=schedule, weight_decay, mask=decay_mask)))

AdamW is Loshchilov & Hutter (2019), "Decoupled weight decay regularization". The learning rate
is injected as a hyper-parameter so the optimizer state carries the value used by the latest
update; `current_learning_rate(opt_state)` reads it back (the train step reports it as `lr`).
Schedules count optimizer *updates*: with `num_iterations = mu` inner updates per train step the
schedule advances mu per step.

Weight decay applies to the parameters that have an `embed` logical axis (every projection
matrix, the embedding and the output head) and not to RMSNorm scales or biases.

Low-precision parameters (bfloat16 / float16) get float32 optimizer state (`float32_state`):
optax's Adam would create its moments in the parameter dtype and then promote them to the
gradients' float32 on the first update, so the train step's output state would differ from its
input (a recompilation, and no buffer reuse, on the second step). Moments kept in bfloat16 would
also lose the second moment's decay: 0.999 * nu rounds back to nu with bfloat16's 8-bit
significand. The parameters themselves stay in their dtype (`optax.apply_updates` casts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from grpo_jax.utils import is_var

SCHEDULES = ("constant", "linear", "cosine")


def make_schedule(learning_rate: float, *, schedule: str = "constant", warmup_steps: int = 0,
                  total_steps: int | None = None, end_fraction: float = 0.0) -> optax.Schedule:
    """Learning rate as a function of the update count.

    Linear warm-up from 0 to `learning_rate` over `warmup_steps` updates, then:
      constant: `learning_rate`;
      linear:   linear decay to `end_fraction * learning_rate` at `total_steps`;
      cosine:   lr_end + (lr - lr_end) (1 + cos(pi s / S)) / 2 with s the steps after warm-up and
                S = total_steps - warmup_steps (Loshchilov & Hutter 2017, SGDR, without restarts).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if learning_rate < 0 or warmup_steps < 0:
        raise ValueError(f"learning_rate and warmup_steps must be >= 0, got {learning_rate}, "
                         f"{warmup_steps}")
    if schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps),
             optax.constant_schedule(learning_rate)], [warmup_steps])
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(f"schedule={schedule!r} needs total_steps > warmup_steps "
                         f"({warmup_steps}), got {total_steps}")
    end = end_fraction * learning_rate
    decay_steps = total_steps - warmup_steps
    if schedule == "linear":
        decay = optax.linear_schedule(learning_rate, end, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps,
                                            alpha=end_fraction)
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay],
                                [warmup_steps])


def decay_mask(params):
    """True for parameters that get weight decay: those with an `embed` logical axis.

    Works on an `nnx.State` of `nnx.Param` (uses their `logical_axes`) and falls back to
    "at least 2-D" for plain arrays.
    """
    def wants_decay(leaf):
        if is_var(leaf):
            axes = leaf.get_metadata().get("logical_axes")
            if axes is not None:
                return "embed" in axes
        return jnp.ndim(leaf) >= 2

    return jax.tree.map(wants_decay, params, is_leaf=is_var)


def _upcast(x):
    """float32 for bfloat16 / float16 arrays, anything else as it is."""
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4:
        return x.astype(jnp.float32)
    return x


def float32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` initialised and updated on float32 views of low-precision params and gradients.

    Its state (e.g. Adam's mu and nu) is then created in float32 and stays float32; updates come
    out in float32 and `optax.apply_updates` casts them to each parameter's dtype. On float32
    parameters it computes exactly what `tx` computes.
    """
    def init(params):
        return tx.init(jax.tree.map(_upcast, params))

    def update(updates, state, params=None):
        params = None if params is None else jax.tree.map(_upcast, params)
        return tx.update(jax.tree.map(_upcast, updates), state, params)

    return optax.GradientTransformation(init, update)


def keep_state_dtypes(new_state, old_state):
    """`new_state` cast leaf by leaf to the dtypes of `old_state` (same structure).

    The train steps apply it after `optimizer.update`, so that any optax transformation (not
    only `make_optimizer`'s) gives a state of the dtypes it was initialised with: a jitted step
    then compiles once and can donate its input state to its output.
    """
    return jax.tree.map(lambda new, old: new.astype(old.dtype) if new.dtype != old.dtype else new,
                        new_state, old_state)


def make_optimizer(learning_rate: float, *, schedule: str = "constant", warmup_steps: int = 0,
                   total_steps: int | None = None, end_fraction: float = 0.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float | None = 1.0
                   ) -> optax.GradientTransformation:
    """Clip-by-global-norm + AdamW on a `make_schedule` learning rate, its state in float32 (see
    the module docstring)."""
    lr = make_schedule(learning_rate, schedule=schedule, warmup_steps=warmup_steps,
                       total_steps=total_steps, end_fraction=end_fraction)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm is None:
        return float32_state(adamw)
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    return float32_state(optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw))


def current_learning_rate(opt_state):
    """The learning rate of the latest update, or None if no injected `learning_rate` exists."""
    found = [s.hyperparams["learning_rate"]
             for s in jax.tree.leaves(opt_state, is_leaf=_is_injected_state)
             if _is_injected_state(s) and "learning_rate" in s.hyperparams]
    return found[0] if found else None


def _is_injected_state(x) -> bool:
    return isinstance(x, (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState))
