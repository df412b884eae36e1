"""Group-relative advantages for GRPO (pure jax.numpy; re-exported by ``grpo_jax.grpo``).

A batch holds ``G`` groups of ``S = group_size`` completions of the same prompt,
the rows of a group contiguous: ``rewards`` is ``[B]`` with ``B = G * S`` and
row ``b`` belongs to group ``b // S``.

``multi_reward_advantages`` is GDPO's (Liu et al. 2026): each reward function's group
advantages, weighted and summed, then normalised over the batch.
"""

from __future__ import annotations

import jax.numpy as jnp

ADVANTAGE_SCALES = ("group", "batch", "none")
BASELINES = ("mean", "leave_one_out")


def group_advantages(rewards, group_size, scale="group", eps=1e-4, *, ddof=0, return_info=False,
                     baseline="mean"):
    """Group-relative advantages: each reward minus its group's mean, optionally scaled.

    For a reward ``r_gj`` (group ``g``, member ``j``) with ``mean_g`` and
    ``std_g`` taken over the group's valid rewards:

        scale="group" (GRPO, Shao et al. 2024, DeepSeekMath):  A = (r - mean_g) / (std_g + eps)
        scale="batch" (std of all valid rewards in the batch): A = (r - mean_g) / (std_B + eps)
        scale="none"  (Dr. GRPO, Liu et al. 2025):             A = r - mean_g

    ``baseline="leave_one_out"`` (RLOO: Kool et al. 2019; Ahmadian et al. 2024, "Back to
    Basics") subtracts the mean of the *other* valid rewards of the group instead, which keeps
    the estimator unbiased: ``r - mean_{-j} = n / (n - 1) (r - mean_g)`` with ``n`` the group's
    valid rewards; the scale then applies as above.

    Standard deviations use ``ddof`` (0: population std; 1: the unbiased
    sample std some implementations use). Special cases, all giving exact zeros:

    * A NaN reward (a reward function that failed) is left out of its group's
      mean and std and of the batch std, and its advantage is 0.
    * A group whose valid rewards are all equal (including a group with one or
      no valid reward) carries no learning signal: all its advantages are 0,
      exactly, whatever the rounding of the mean.

    Args:
      rewards: ``[B]`` rewards (any real dtype; computed in at least float32).
      group_size: ``S``, a Python int (static under ``jax.jit``); must divide ``B``.
      scale: one of ``ADVANTAGE_SCALES`` (static).
      eps: added to the std before dividing.
      ddof: delta degrees of freedom of the std.
      return_info: also return a dict of scalars:
        ``num_nan_rewards`` (int32 count of NaN rewards) and
        ``frac_reward_zero_std`` (fraction of groups whose valid rewards have
        zero std, i.e. groups that give no gradient).

    Returns:
      ``advantages`` ``[B]``, or ``(advantages, info)`` with ``return_info=True``.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if jnp.ndim(rewards) != 1:
        raise ValueError(f"rewards must be [B] (groups contiguous), got shape {jnp.shape(rewards)}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    (batch,) = jnp.shape(rewards)
    if batch % group_size:
        raise ValueError(f"the number of rewards ({batch}) is not divisible by "
                         f"group_size ({group_size})")

    rewards = jnp.asarray(rewards)
    dtype = jnp.result_type(rewards.dtype, jnp.float32)
    rewards_GS = rewards.astype(dtype).reshape(-1, group_size)
    valid_GS = ~jnp.isnan(rewards_GS)
    num_valid_G1 = valid_GS.sum(axis=-1, keepdims=True)

    mean_G1 = (jnp.where(valid_GS, rewards_GS, 0.0).sum(axis=-1, keepdims=True)
               / jnp.maximum(num_valid_G1, 1))
    centered_GS = jnp.where(valid_GS, rewards_GS - mean_G1, 0.0)

    # Zero spread is decided on the rewards themselves (max == min), not on a
    # rounded std, so equal rewards give exactly zero advantages.
    max_G1 = jnp.max(jnp.where(valid_GS, rewards_GS, -jnp.inf), axis=-1, keepdims=True)
    min_G1 = jnp.min(jnp.where(valid_GS, rewards_GS, jnp.inf), axis=-1, keepdims=True)
    zero_std_G1 = (num_valid_G1 <= 1) | (max_G1 == min_G1)

    if scale == "group":
        denominator = _std(centered_GS, num_valid_G1, ddof, axis=-1) + eps
    elif scale == "batch":
        num_valid = valid_GS.sum()
        batch_mean = jnp.where(valid_GS, rewards_GS, 0.0).sum() / jnp.maximum(num_valid, 1)
        batch_centered_GS = jnp.where(valid_GS, rewards_GS - batch_mean, 0.0)
        denominator = _std(batch_centered_GS, num_valid, ddof, axis=None) + eps
    else:
        denominator = 1.0

    if baseline == "leave_one_out":  # the std above is of the rewards, as for the mean baseline
        centered_GS = centered_GS * (num_valid_G1 / jnp.maximum(num_valid_G1 - 1, 1))
    advantages_GS = jnp.where(valid_GS & ~zero_std_G1, centered_GS / denominator, 0.0)
    advantages = advantages_GS.reshape(batch)
    if not return_info:
        return advantages
    info = {
        "num_nan_rewards": jnp.sum(~valid_GS, dtype=jnp.int32),
        "frac_reward_zero_std": jnp.mean(zero_std_G1.astype(jnp.float32)),
    }
    return advantages, info


def multi_reward_advantages(scores, weights, group_size, *, scale="group", baseline="mean", eps=1e-4):
    """GDPO: group reward-decoupled normalisation of several rewards (Liu et al. 2026, "GDPO: Group
    reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization",
    arXiv:2601.05242; NVlabs/GDPO's TRL and verl code).

    Summing the rewards first and normalising the sum per group (GRPO) maps different
    combinations of the rewards to the same advantage (e.g. two binary rewards: (1, 0) and
    (0, 1) tie), and a reward with a large spread swamps the others. GDPO normalises each
    function ``f``'s scores within the group first, then sums with the weights ``w_f``, then
    normalises the sum over the batch so its range does not grow with the number of rewards:

        A_f   = group_advantages(s_f, S, scale, eps, baseline=baseline)    ((s_f - mean_g) / (std_g + eps))
        A_sum = sum_f w_f A_f
        A     = (A_sum - mean_B(A_sum)) / (std_B(A_sum) + eps)

    with the batch mean and (population) std over the valid episodes. NVlabs' code uses torch's
    sample std (ddof = 1) in both places; this uses the population std of ``group_advantages``.

    NaN scores (a function that failed on an episode): that function's contribution to the
    episode is 0 and the episode is left out of that function's group mean and std
    (``group_advantages``). NVlabs' code instead replaces NaN with 0 before normalising. An episode
    with no valid score from any weighted function gets 0 and is left out of the batch mean and
    std. A group where no function's scores vary gets exact zeros (its summed advantages are 0,
    and so is the batch mean in exact arithmetic: every group's advantages sum to 0).

    Args:
      scores: {function name: ``[B]`` scores} (``RubricScores.scores``); functions not in
        ``weights`` (logged metrics) are ignored.
      weights: {function name: weight}; every name must be in ``scores``; weight 0 = ignored.
      group_size: ``S`` (groups contiguous, as ``group_advantages``).
      scale, baseline, eps: of each function's ``group_advantages``; ``eps`` also of the batch std.

    Returns:
      ``[B]`` advantages (float32 or wider).
    """
    missing = sorted(set(weights) - set(scores))
    if missing:
        raise ValueError(f"weights name functions with no scores: {missing}; scored: {sorted(scores)}")
    names = [name for name, w in weights.items() if w != 0]
    if not names:
        raise ValueError(f"multi_reward_advantages needs a function with a non-zero weight, got {dict(weights)}")
    total, valid = None, None
    for name in names:
        scores_B = jnp.asarray(scores[name])
        term = float(weights[name]) * group_advantages(scores_B, group_size, scale, eps, baseline=baseline)
        ok = ~jnp.isnan(scores_B)
        total = term if total is None else total + term
        valid = ok if valid is None else valid | ok
    batch = total.shape[0]
    signal_G1 = jnp.any(total.reshape(-1, group_size) != 0, axis=-1, keepdims=True)
    keep = valid & jnp.broadcast_to(signal_G1, (batch // group_size, group_size)).reshape(batch)
    count = jnp.maximum(valid.sum(), 1)
    mean = jnp.where(valid, total, 0.0).sum() / count
    std = jnp.sqrt(jnp.where(valid, (total - mean) ** 2, 0.0).sum() / count)
    return jnp.where(keep, (total - mean) / (std + eps), 0.0)


def _std(centered, num_valid, ddof, axis):
    """Std from already-centred values (zeros where invalid) and a count of valid ones."""
    keepdims = axis is not None
    sum_sq = jnp.sum(centered * centered, axis=axis, keepdims=keepdims)
    return jnp.sqrt(sum_sq / jnp.maximum(num_valid - ddof, 1))
