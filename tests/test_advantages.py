"""Tests for group-relative advantages (`grpo_jax.grpo.group_advantages`)."""

import math

import jax
import numpy as np
import pytest

from grpo_jax import grpo

# Many shapes: one compilation per call is cheaper than op by op.
group_advantages = jax.jit(grpo.group_advantages,
                           static_argnames=("group_size", "scale", "ddof", "return_info"))



def test_advantages_zero_mean_per_group_and_unit_std():
    rewards = np.random.default_rng(0).normal(size=24).astype(np.float32)
    adv = np.asarray(group_advantages(rewards, 6, eps=0.0)).reshape(4, 6)
    np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv.std(axis=1), 1.0, rtol=1e-5)


def test_advantages_group_scale_by_hand():
    adv = group_advantages(np.array([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0]), 4, eps=1e-4)
    # group 0: mean .5, std .5; group 1: mean 2, std sqrt(.5)
    expected = [0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001,
                1 / (math.sqrt(0.5) + 1e-4), -1 / (math.sqrt(0.5) + 1e-4), 0.0, 0.0]
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    adv1 = group_advantages(np.array([1.0, 0.0]), 2, eps=0.0, ddof=1)
    np.testing.assert_allclose(adv1, [0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)], rtol=1e-6)


def test_advantages_exactly_zero_when_group_rewards_equal():
    # In float32, 7 * 0.1 / 7 != 0.1 (and 3 * 0.9 / 3 != 0.9): a mean-subtracted reward is
    # ~1e-8, which a tiny std would blow up. Equal rewards must still give exact zeros.
    rewards = np.array([0.1] * 7 + [0.9] * 7 + [0.0, 1.0, 0.25, 0.0, 0.0, 0.0, 0.0], np.float32)
    assert np.float32(rewards[:7].sum(dtype=np.float32) / np.float32(7)) != rewards[0]
    for scale in grpo.ADVANTAGE_SCALES:
        adv, info = group_advantages(rewards, 7, scale=scale, return_info=True)
        assert np.all(np.asarray(adv)[:14] == 0.0), scale
        assert np.all(np.asarray(adv)[14:17] != 0.0), scale
        np.testing.assert_allclose(info["frac_reward_zero_std"], 2 / 3)


def test_advantages_nan_rewards_left_out_and_counted():
    rewards = np.array([1.0, np.nan, 0.0, 2.0, np.nan, np.nan, 5.0, 5.0, np.nan, 4.0, 4.0, 4.0])
    adv, info = group_advantages(rewards, 4, eps=0.0, return_info=True)
    adv = np.asarray(adv)
    # group 0 valid {1, 0, 2}: mean 1, population std sqrt(2/3)
    s = math.sqrt(2 / 3)
    np.testing.assert_allclose(adv[:4], [0.0, 0.0, -1 / s, 1 / s], rtol=1e-6)
    assert adv[1] == 0.0 and np.all(np.isfinite(adv))
    assert np.all(adv[4:] == 0.0)        # {5, 5} and {4, 4, 4}: zero std
    assert int(info["num_nan_rewards"]) == 4
    np.testing.assert_allclose(info["frac_reward_zero_std"], 2 / 3)
    all_nan, info = group_advantages(np.full(4, np.nan), 2, return_info=True)
    assert np.all(np.asarray(all_nan) == 0.0) and int(info["num_nan_rewards"]) == 4


def test_advantages_batch_and_none_scales_by_hand():
    rewards = np.array([1.0, 3.0, 0.0, 4.0, np.nan, 2.0])
    none = group_advantages(rewards, 2, scale="none")
    np.testing.assert_allclose(none, [-1.0, 1.0, -2.0, 2.0, 0.0, 0.0], rtol=1e-6)
    valid = np.array([1.0, 3.0, 0.0, 4.0, 2.0])
    batch_std = math.sqrt(np.mean((valid - valid.mean()) ** 2))
    batch = group_advantages(rewards, 2, scale="batch", eps=1e-4)
    expected = np.array([-1.0, 1.0, -2.0, 2.0, 0.0, 0.0]) / (batch_std + 1e-4)
    np.testing.assert_allclose(batch, expected, rtol=1e-6)


def test_advantages_validation():
    rewards = np.zeros(12, np.float32)
    with pytest.raises(ValueError, match="not divisible"):
        grpo.group_advantages(rewards, 5)
    with pytest.raises(ValueError, match="'group', 'batch', 'none'"):
        grpo.group_advantages(rewards, 4, scale="std")
    with pytest.raises(ValueError, match=r"\[B\]"):
        grpo.group_advantages(rewards.reshape(3, 4), 4)


def test_leave_one_out_baseline_by_hand():
    """RLOO: each reward minus the mean of the others in its group (NaN left out), then scaled."""
    import jax.numpy as jnp
    group_advantages = grpo.group_advantages
    rewards = jnp.asarray([1.0, 0.0, 0.0, 2.0, 1.0, jnp.nan, 3.0, 3.0])
    got = group_advantages(rewards, 4, "none", baseline="leave_one_out")
    # group 1: others' means 2/3, 1, 1, 1/3; group 2 (valid 1, 3, 3): 3, 2, -, 2
    np.testing.assert_allclose(got, [1 / 3, -1.0, -1.0, 5 / 3, -2.0, 0.0, 1.0, 1.0], rtol=1e-6)
    mean = group_advantages(rewards, 4, "group")
    loo = group_advantages(rewards, 4, "group", baseline="leave_one_out")
    np.testing.assert_allclose(loo, mean * np.array([4 / 3] * 4 + [3 / 2] * 4), rtol=1e-5)
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(rewards, 4, baseline="median")


def test_multi_reward_advantages_gdpo_by_hand():
    """GDPO: each function's group advantages, weighted, summed, then normalised over the batch."""
    from grpo_jax.advantages import multi_reward_advantages as gdpo

    def multi_reward_advantages(scores, weights, group_size, **kwargs):  # one compile, not op by op
        return jax.jit(lambda s: gdpo(s, weights, group_size, **kwargs))(scores)
    scores = {"correct": np.array([1.0, 0.0, 0.0, 1.0]), "length": np.array([0.0, 10.0, 5.0, 5.0]),
              "metric": np.array([np.nan, 3.0, 1.0, 2.0])}  # not weighted: ignored
    weights = {"correct": 2.0, "length": 0.5, "metric": 0.0}
    got = np.asarray(multi_reward_advantages(scores, weights, 2, eps=0.0))
    # correct: +-1 per group, x2; length: (-1, 1) in group 0, ties in group 1, x0.5.
    pre = np.array([2 - 0.5, -2 + 0.5, -2.0, 2.0])
    np.testing.assert_allclose(got, pre / np.sqrt(np.mean(pre ** 2)), rtol=1e-6)
    assert got[0] > 0  # the correct, short episode 0 is favoured ...
    summed = 2.0 * scores["correct"] + 0.5 * scores["length"]
    grpo_adv = np.asarray(group_advantages(summed, 2, eps=0.0))
    np.testing.assert_allclose(grpo_adv, [-1.0, 1.0, -1.0, 1.0], rtol=1e-6)  # ... not when length dominates

    # NaN: a function's NaN score contributes 0 (and leaves its group's statistics); an episode
    # with no valid score gets 0 and leaves the batch's; a group without signal stays exactly 0.
    scores = {"correct": np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, np.nan, np.nan]),
              "length": np.array([0.0, 10.0, 5.0, 5.0, np.nan, 4.0, np.nan, 3.0])}
    got = np.asarray(multi_reward_advantages(scores, {"correct": 2.0, "length": 0.5}, 2, eps=0.0))
    pre = np.array([1.5, -1.5, -2.0, 2.0, 2.0, -2.0, 0.0, 0.0])
    std = np.sqrt(np.sum(pre ** 2) / 7)  # episode 6 has no valid score: 7 valid episodes, mean 0
    np.testing.assert_allclose(got, pre / std, rtol=1e-6)
    assert got[6] == 0.0 and got[7] == 0.0
    with pytest.raises(ValueError, match="no scores"):
        multi_reward_advantages(scores, {"format": 1.0}, 2)
