"""Turn-level credit assignment for multi-turn episodes (numpy, on the host).

An episode ``i`` of ``T_i`` assistant turns gets a reward ``r_ik`` for each turn ``k < T_i``: the
env's per-turn reward (``grpo_jax.envs.base.record_turn_reward``, gathered by
``turn_rewards_from_states``) plus, at its last turn ``k = T_i - 1``, the rubric's episode
(terminal) reward. Its return from turn ``k`` is

    G_ik = sum_{j = k}^{T_i - 1} gamma^(j - k) r_ij                     (gamma = ``discount``)

``turn_advantages`` gives each turn ``G_ik - b_ik`` with a leave-one-out baseline over the other
episodes of the group that reached turn ``k``, and ``token_advantages`` spreads them over the
turns' tokens: the per-token advantages ``pack_rollout`` and the loss take ([N, T]).

Arrays: N episodes, groups of ``group_size`` contiguous (as ``group_advantages``), K = the most
turns an episode can have (``max_turns``).
"""

from __future__ import annotations

import numpy as np

from grpo_jax.advantages import ADVANTAGE_SCALES
from grpo_jax.envs.base import record_turn_reward, turn_rewards_from_states

__all__ = ["discounted_returns", "record_turn_reward", "token_advantages", "turn_advantages", "turn_index",
           "turn_rewards_from_states"]


def turn_advantages(turn_rewards_NK, num_turns_N, final_rewards_N, group_size, *, discount=1.0,
                    scale="group", eps=1e-4):
    """Per-turn advantages ``A_ik = (G_ik - b_ik) / s`` with a leave-one-out baseline.

    Baseline (RLOO's, Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!",
    taken per turn): with ``R_k(i)`` the other valid episodes ``j != i`` of ``i``'s group that
    reached turn ``k`` (``T_j > k``),

        b_ik = mean_{j in R_k(i)} G_jk,    and b_ik = 0 when R_k(i) is empty.

    Unbiasedness. The episodes of a group are i.i.d. given the prompt, so ``b_ik`` is a function
    of the other episodes only, independent of everything episode ``i`` does, including how many
    turns it takes. Hence ``E[b_ik 1(T_i > k) grad log pi(a_ik | h_ik)] = E[b_ik] E[1(T_i > k)
    E[grad log pi(a_ik | h_ik) | h_ik]] = 0``, and

        E[sum_k A_ik grad log pi(a_ik | h_ik)] = sum_k E[1(T_i > k) G_ik grad log pi(a_ik | h_ik)],

    the policy gradient of the return (of the discounted returns without the gamma^k weight of
    the turn for gamma < 1, the usual practice), exactly, whenever ``scale="none"``, for any
    stopping rule of the policy's and any group size (with one episode per group it is plain
    REINFORCE). It holds because the baseline leaves ``i`` out: a mean over the group including
    ``i``'s own return shrinks the gradient by ``(n - 1) / n``, and a per-turn mean over the
    episodes that reached ``k`` including ``i`` depends on ``i``'s own choice to get there. The
    ``b = 0`` fallback keeps it unbiased where no other episode reached the turn (an alternative,
    ``A = 0`` there, would weight turn ``k``'s term by ``P(another episode reaches k)``).
    ``scale="group"`` / ``"batch"`` divide by a statistic that includes ``i`` (as GRPO's std
    does; Liu et al. 2025, Dr. GRPO): a positive per-group (per-batch) step size, unbiased only
    up to it.

    Scale ``s``: "none": 1. "group": ``rms_g + eps`` with ``rms_g`` the root mean square of the
    group's unscaled advantages over the turns its valid episodes reached (their std: at a turn
    two or more episodes reached they sum to 0). "batch": the same over the batch. It is never
    0 while an advantage is not, unlike the std of the episode returns (a group whose episodes
    have equal total returns can still differ turn by turn).

    Reductions. With K = 1 (one turn, the final reward only) ``G_i0 = r_i`` and ``A_i0`` is the
    RLOO advantage, ``group_advantages(r, S, scale="none", baseline="leave_one_out")`` exactly
    (groups with >= 2 valid rewards); with ``scale="group"`` it is
    ``group_advantages(r, S, scale="group", baseline="mean")`` (the RLOO one times
    ``(n - 1) / n``, n valid rewards), up to ``eps``.

    Exact zeros: turns an episode did not reach, every turn of an episode whose final reward (or
    a reached turn's reward) is NaN (it is also left out of the baselines and the scale, as
    ``group_advantages`` leaves NaN rewards out), and a turn where two or more episodes of the
    group reached it with equal returns.

    Args:
      turn_rewards_NK: ``[N, K]`` per-turn env rewards (``turn_rewards_from_states``); entries at
        turns an episode did not reach are ignored.
      num_turns_N: ``[N]`` assistant turns ``T_i`` of each episode, ``0 <= T_i <= K``.
      final_rewards_N: ``[N]`` the rubric's episode rewards (NaN where scoring failed), added at
        each episode's last turn.
      group_size: episodes per group (contiguous); must divide N.
      discount: ``gamma`` in ``[0, 1]``.
      scale: one of ``ADVANTAGE_SCALES``.
      eps: added to the scale before dividing.

    Returns:
      ``[N, K]`` float32 advantages.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    rewards_NK = np.asarray(turn_rewards_NK, np.float64)
    if rewards_NK.ndim != 2:
        raise ValueError(f"turn_rewards_NK must be [N, K], got shape {rewards_NK.shape}")
    n, k_max = rewards_NK.shape
    turns_N = np.asarray(num_turns_N, np.int64)
    final_N = np.asarray(final_rewards_N, np.float64)
    if turns_N.shape != (n,) or final_N.shape != (n,):
        raise ValueError(f"num_turns_N and final_rewards_N must be [N] = ({n},), got "
                         f"{turns_N.shape} and {final_N.shape}")
    if turns_N.size and (turns_N.min() < 0 or turns_N.max() > k_max):
        raise ValueError(f"num_turns_N must be in 0..K = 0..{k_max}, got {turns_N.min()}..{turns_N.max()}")
    if not isinstance(group_size, int) or group_size <= 0 or n % group_size:
        raise ValueError(f"group_size must be a positive int dividing N = {n}, got {group_size!r}")

    reached_NK = np.arange(k_max)[None, :] < turns_N[:, None]
    last_NK = np.arange(k_max)[None, :] == (turns_N - 1)[:, None]
    rewards_NK = np.where(reached_NK, rewards_NK, 0.0) + np.where(last_NK, final_N[:, None], 0.0)
    valid_N = ~np.isnan(rewards_NK).any(axis=1)
    live_NK = reached_NK & valid_N[:, None]  # the (episode, turn) pairs that count
    returns_NK = discounted_returns(np.where(live_NK, rewards_NK, 0.0), discount)

    groups = n // group_size
    live_GSK = live_NK.reshape(groups, group_size, k_max)
    returns_GSK = np.where(live_GSK, returns_NK.reshape(groups, group_size, k_max), 0.0)
    count_G1K = live_GSK.sum(axis=1, keepdims=True)
    others_GSK = count_G1K - live_GSK  # other live episodes at the turn
    baseline_GSK = np.where(others_GSK > 0, (returns_GSK.sum(axis=1, keepdims=True) - returns_GSK)
                            / np.maximum(others_GSK, 1), 0.0)
    advantages_GSK = returns_GSK - baseline_GSK
    # Equal returns at a turn give exact zeros, whatever the rounding of the others' mean.
    high_G1K = np.max(np.where(live_GSK, returns_GSK, -np.inf), axis=1, keepdims=True)
    low_G1K = np.min(np.where(live_GSK, returns_GSK, np.inf), axis=1, keepdims=True)
    tied_G1K = (count_G1K >= 2) & (high_G1K == low_G1K)
    advantages_GSK = np.where(live_GSK & ~tied_G1K, advantages_GSK, 0.0)

    if scale != "none":
        axes = (1, 2) if scale == "group" else None
        rms = np.sqrt(np.sum(advantages_GSK ** 2, axis=axes, keepdims=True)
                      / np.maximum(live_GSK.sum(axis=axes, keepdims=True), 1))
        # rms = 0 only where every advantage is 0 (eps = 0 must not give 0 / 0).
        advantages_GSK = np.divide(advantages_GSK, rms + eps, out=np.zeros_like(advantages_GSK),
                                   where=rms > 0)
    return advantages_GSK.reshape(n, k_max).astype(np.float32)


def discounted_returns(rewards_NK, discount=1.0):
    """``G_ik = sum_{j >= k} gamma^(j - k) r_ij`` (``[N, K]``; rewards past an episode's last
    turn must be 0)."""
    rewards_NK = np.asarray(rewards_NK, np.float64)
    returns_NK = np.zeros_like(rewards_NK)
    running_N = np.zeros(rewards_NK.shape[0])
    for k in range(rewards_NK.shape[1] - 1, -1, -1):  # G_k = r_k + gamma G_{k+1}
        running_N = rewards_NK[:, k] + discount * running_N
        returns_NK[:, k] = running_N
    return returns_NK


def turn_index(completion_mask_NT):
    """``[N, T]`` int32: k on the tokens of an episode's k-th assistant turn (the k-th contiguous
    run of ``completion_mask``, counted from 0), -1 on env and prompt tokens and padding.

    Turns are separated by the env's reply tokens (always at least the generation prompt), so
    each run is one turn (`grpo_jax.rollout`'s layout)."""
    mask_NT = np.asarray(completion_mask_NT, bool)
    starts_NT = mask_NT & ~np.pad(mask_NT, ((0, 0), (1, 0)))[:, :-1]
    return np.where(mask_NT, np.cumsum(starts_NT, axis=1) - 1, -1).astype(np.int32)


def token_advantages(adv_NK, completion_mask_NT):
    """``[N, T]`` float32: each model token gets its turn's advantage ``adv_NK[i, k]`` (turn k =
    the k-th contiguous run of ``completion_mask``, `turn_index`); env / prompt tokens and
    padding get 0. Raises when an episode has more turns in its mask than K columns."""
    adv_NK = np.asarray(adv_NK, np.float32)
    turn_NT = turn_index(completion_mask_NT)
    if adv_NK.ndim != 2 or adv_NK.shape[0] != turn_NT.shape[0]:
        raise ValueError(f"adv_NK must be [N, K] with N = {turn_NT.shape[0]}, got {adv_NK.shape}")
    runs = int(turn_NT.max(initial=-1)) + 1
    if runs > adv_NK.shape[1]:
        row = int(np.argmax(turn_NT.max(axis=1)))
        raise ValueError(f"episode {row} has {runs} model-token runs (turns) but adv_NK has "
                         f"K = {adv_NK.shape[1]} columns")
    picked_NT = np.take_along_axis(adv_NK, np.maximum(turn_NT, 0), axis=1) if adv_NK.shape[1] else \
        np.zeros(turn_NT.shape, np.float32)
    return np.where(turn_NT >= 0, picked_NT, 0.0).astype(np.float32)
