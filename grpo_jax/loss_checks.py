"""Argument checks of the loss family (`grpo_jax.grpo`): all at trace time, from static shapes
and Python hyper-parameters, so a bad setting fails before anything is computed or compiled."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
TIS_MODES = ("truncate", "mask")     # TIS (Yao et al. 2025) | MIS (Liu et al. 2025)
TIS_LEVELS = ("token", "sequence")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_max_completion_length(max_completion_length):
    if max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' normalises by sequences * max_completion_length: "
                         "pass max_completion_length (the sampler's completion budget)")
    if not isinstance(max_completion_length, int) or max_completion_length <= 0:
        raise ValueError("max_completion_length must be a positive int, got "
                         f"{max_completion_length!r}")


def _check_shapes(logps, old_logps, advantages, mask, ref_logps, sampler_logps, sequence_ids=None,
                  entropy=None):
    shape = jnp.shape(logps)
    if len(shape) != 2:
        raise ValueError(f"logps must be [B, T], got shape {shape}")
    named = {"old_logps": old_logps, "mask": mask, "ref_logps": ref_logps,
             "sampler_logps": sampler_logps, "sequence_ids": sequence_ids, "entropy": entropy}
    for name, x in named.items():
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(f"{name} must have the shape of logps {shape}, got {jnp.shape(x)}")
    if jnp.shape(advantages) not in (shape[:1], shape):
        raise ValueError(f"advantages must be [B] = {shape[:1]} (one per row of logps) or [B, T] = "
                         f"{shape} (per token), got shape {jnp.shape(advantages)}")


def _static_float(x: Any):
    """``float(x)`` for a concrete number, None for a traced value."""
    if isinstance(x, jax.core.Tracer):
        return None
    return float(x)


def check_settings(*, loss_type="grpo", epsilon=0.2, epsilon_high=None, delta=None,
                   importance_sampling_level="token", beta=0.0, tis_cap=None, tis_mode="truncate",
                   tis_level="token", entropy_coef=0.0, high_entropy_fraction=None):
    """Raises ``ValueError`` naming the setting for a loss setting ``policy_loss`` rejects.

    The one place these checks live: ``policy_loss_sum`` runs them at trace time and
    ``TrainConfig`` (``grpo_jax.train_inputs``) when it is made, so a config fails before compiling.
    Traced ``epsilon``, ``epsilon_high``, ``delta``, ``beta``, ``tis_cap`` or ``entropy_coef``
    skip their range checks. The messages name the setting as the config does (``grpo.<name>``).
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("importance_sampling_level", importance_sampling_level,
                  IMPORTANCE_SAMPLING_LEVELS)
    eps = _static_float(epsilon)
    eps_high = eps if epsilon_high is None else _static_float(epsilon_high)
    if loss_type == "cispo" and (epsilon_high is None or (eps_high is not None and eps_high <= 0)):
        raise ValueError(f"epsilon_high must be > 0 for loss_type='cispo', got {epsilon_high}: its "
                         "IS weight is truncated at 1 + epsilon_high (MiniMax-M1 tunes only this "
                         "upper bound)")
    for name, value in (("epsilon", eps), ("epsilon_high", eps_high)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if delta is not None:
        if loss_type == "cispo":
            raise ValueError("delta (two-sided clipping) applies to the clipped-surrogate losses; "
                             "cispo already caps its weight at 1 + epsilon_high")
        d = _static_float(delta)
        if d is not None and eps_high is not None and d <= 1.0 + eps_high:
            raise ValueError(f"delta must exceed 1 + epsilon_high = {1.0 + eps_high}, got {d}")
    b = _static_float(beta)
    if b is not None and b < 0:
        raise ValueError(f"beta must be >= 0, got {b}")
    _check_choice("tis_mode (grpo.tis_mode)", tis_mode, TIS_MODES)
    _check_choice("tis_level (grpo.tis_level)", tis_level, TIS_LEVELS)
    cap = None if tis_cap is None else _static_float(tis_cap)
    if cap is not None and cap <= 0:
        raise ValueError(f"tis_cap (grpo.tis_cap) must be > 0, got {cap}")
    coef = _static_float(entropy_coef)
    if coef is not None and coef < 0:
        raise ValueError(f"entropy_coef (grpo.entropy_coef) must be >= 0 (a bonus), got {coef}")
    if high_entropy_fraction is not None and not 0 < float(high_entropy_fraction) <= 1:
        raise ValueError("high_entropy_fraction (grpo.high_entropy_fraction) must be in (0, 1] "
                         f"(the share of tokens trained) or None, got {high_entropy_fraction}")


def _resolve_settings(loss_type, importance_sampling_level, epsilon, epsilon_high, delta, beta,
                      max_completion_length, has_ref, has_sampler, tis_cap, *, tis_mode="truncate",
                      tis_level="token", has_entropy=False, entropy_coef=0.0, high_entropy_fraction=None):
    check_settings(loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high, delta=delta,
                   importance_sampling_level=importance_sampling_level, beta=beta, tis_cap=tis_cap,
                   tis_mode=tis_mode, tis_level=tis_level, entropy_coef=entropy_coef,
                   high_entropy_fraction=high_entropy_fraction)
    if loss_type == "dr_grpo":
        _check_max_completion_length(max_completion_length)
    b = _static_float(beta)
    use_kl = b is None or b > 0
    if use_kl and not has_ref:
        raise ValueError("beta > 0 (or a traced beta) adds a KL penalty to the reference "
                         "policy: pass ref_logps")
    if tis_cap is not None and not has_sampler:
        raise ValueError("tis_cap given without sampler_logps: truncated importance "
                         "sampling needs the sampler's log-probs")
    coef = _static_float(entropy_coef)
    use_entropy_bonus = coef is None or coef != 0
    if (use_entropy_bonus or high_entropy_fraction is not None) and not has_entropy:
        raise ValueError("entropy_coef != 0 or high_entropy_fraction needs the policy's entropy: "
                         "pass entropy")
    return {
        "sequence_level": loss_type == "gspo" or importance_sampling_level == "sequence",
        "epsilon_high": epsilon if epsilon_high is None else epsilon_high,
        "use_kl": use_kl,
        "use_tis": tis_cap is not None,
        "use_entropy_bonus": use_entropy_bonus,
    }
