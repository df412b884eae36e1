"""Tests for turn-level credit (`grpo_jax.credit`), the per-turn reward convention of envs and the
TurnBandit toy env (`grpo_jax.envs.turn_bandit`)."""

import numpy as np
import pytest

from grpo_jax import credit
from grpo_jax.advantages import group_advantages
from grpo_jax.envs.base import record_turn_reward, replay_episodes, run_episodes, turn_rewards_from_states
from grpo_jax.envs.registry import make_env
from grpo_jax.envs.turn_bandit import TurnBanditEnv, best_picks

NAN = float("nan")


def test_turn_advantages_by_hand():
    # Group 0 (gamma = 1): episode 0 turn rewards (1, 0, 0.5) + final 2 -> r = (1, 0, 2.5),
    # G = (3.5, 2.5, 2.5); episode 1 one turn, final 1 (its 7 at an unreached turn is ignored),
    # G = (1,); episode 2 r = (0.5, 0), G = (0.5, 0).
    turn_rewards = [[1.0, 0.0, 0.5], [0.0, 7.0, 0.0], [0.5, 0.0, 0.0],
                    # group 1: equal returns (no signal), and a NaN final reward left out
                    [0.1, 0.0, 0.0], [0.1, 0.0, 0.0], [0.3, 0.0, 0.0]]
    turns, final = [3, 1, 2, 2, 2, 2], [2.0, 1.0, 0.0, 0.2, 0.2, NAN]
    adv = credit.turn_advantages(turn_rewards, turns, final, 3, scale="none")
    expected = [[3.5 - (1 + 0.5) / 2, 2.5 - 0.0, 2.5],   # turn 2: no other episode -> b = 0
                [1 - (3.5 + 0.5) / 2, 0.0, 0.0],
                [0.5 - (3.5 + 1) / 2, 0.0 - 2.5, 0.0],
                [0.0] * 3, [0.0] * 3, [0.0] * 3]
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    assert adv.dtype == np.float32 and np.all(adv[3:] == 0.0)
    # scale="group": the rms of group 0's six live advantages is sqrt(30.375 / 6) = 2.25.
    scaled = credit.turn_advantages(turn_rewards, turns, final, 3, scale="group", eps=0.0)
    np.testing.assert_allclose(scaled, np.asarray(expected) / 2.25, rtol=1e-6)
    # gamma = 0.5: episode 0 G = (1 + 0.5 * 1.25, 0 + 0.5 * 2.5, 2.5) = (1.625, 1.25, 2.5).
    discounted = credit.turn_advantages(turn_rewards, turns, final, 3, discount=0.5, scale="none")
    np.testing.assert_allclose(discounted[:3], [[1.625 - 0.75, 1.25, 2.5], [1 - (1.625 + 0.5) / 2, 0, 0],
                                                [0.5 - (1.625 + 1) / 2, -1.25, 0]], rtol=1e-6)


def test_one_turn_reduces_to_rloo():
    rewards = np.random.default_rng(1).integers(0, 3, 24).astype(np.float32)
    rewards[[3, 9, 10]] = NAN
    rewards[16:20] = 1.0  # a group of equal rewards
    adv = credit.turn_advantages(np.zeros((24, 1)), np.ones(24, int), rewards, 4, scale="none")[:, 0]
    rloo = np.asarray(group_advantages(rewards, 4, scale="none", baseline="leave_one_out"))
    np.testing.assert_allclose(adv, rloo, rtol=1e-6, atol=1e-7)
    # scale="group": GRPO's advantage, i.e. RLOO's up to its factor n / (n - 1).
    adv = credit.turn_advantages(np.zeros((24, 1)), np.ones(24, int), rewards, 4, scale="group")[:, 0]
    grpo = np.asarray(group_advantages(rewards, 4, scale="group", baseline="mean"))
    np.testing.assert_allclose(adv, grpo, rtol=1e-3, atol=1e-6)


def _simulate(rng, pi_KA, r_KA, groups, group_size):
    """Episodes of the bandit: at turn k pick a ~ pi_KA[k], earn r_KA[k, a]; the last arm stops."""
    n, (k_max, arms) = groups * group_size, pi_KA.shape
    actions_NK = np.stack([rng.choice(arms, size=n, p=pi_KA[k]) for k in range(k_max)], axis=1)
    stopped_NK = actions_NK == arms - 1
    turns_N = np.where(stopped_NK.any(axis=1), stopped_NK.argmax(axis=1) + 1, k_max)
    reached_NK = np.arange(k_max)[None] < turns_N[:, None]
    rewards_NK = np.where(reached_NK, r_KA[np.arange(k_max)[None], actions_NK], 0.0)
    final_N = rewards_NK[np.arange(n), turns_N - 1]
    rewards_NK[np.arange(n), turns_N - 1] = 0.0  # the last turn's reward is the terminal one
    return actions_NK, turns_N, reached_NK, rewards_NK, final_N


def _true_gradient(pi_KA, r_KA, gamma):
    """d J / d logit[k, b] of a per-turn softmax: P(reach k) pi(b) (Q_k(b) - V_k), discounted Q."""
    k_max, arms = pi_KA.shape
    q_KA, v_next = np.zeros_like(r_KA), 0.0
    for k in range(k_max - 1, -1, -1):
        goes_on = (np.arange(arms) != arms - 1) & (k < k_max - 1)
        q_KA[k] = r_KA[k] + gamma * goes_on * v_next
        v_next = pi_KA[k] @ q_KA[k]
    v_K = np.sum(pi_KA * q_KA, axis=1)
    reach_K = np.concatenate([[1.0], np.cumprod(1 - pi_KA[:-1, -1])])
    return reach_K[:, None] * pi_KA * (q_KA - v_K[:, None])


def _gradient_terms(adv_NK, actions_NK, reached_NK, pi_KA, group_size):
    """Per group: the mean over its episodes of A_ik (1(a_ik = b) - pi_k(b)) on reached turns
    (the estimator of d J / d logit[k, b]), [groups, K, arms]."""
    score_NKA = (actions_NK[..., None] == np.arange(pi_KA.shape[1])) - pi_KA[None]
    terms_NKA = (adv_NK * reached_NK)[..., None] * score_NKA
    return terms_NKA.reshape(-1, group_size, *terms_NKA.shape[1:]).mean(axis=1)


def test_turn_advantages_are_unbiased_when_the_policy_stops_and_a_self_inclusive_baseline_is_not():
    rng = np.random.default_rng(0)
    pi_KA = np.array([[0.4, 0.3, 0.3], [0.3, 0.3, 0.4], [0.5, 0.3, 0.2]])  # arms a, b, stop
    r_KA = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, 0.3], [1.0, 0.0, 0.2]])
    gamma, group_size, groups = 0.9, 4, 25_000
    truth = _true_gradient(pi_KA, r_KA, gamma)
    actions_NK, turns_N, reached_NK, rewards_NK, final_N = _simulate(rng, pi_KA, r_KA, groups, group_size)

    adv_NK = credit.turn_advantages(rewards_NK, turns_N, final_N, group_size, discount=gamma, scale="none")
    per_group = _gradient_terms(adv_NK, actions_NK, reached_NK, pi_KA, group_size)
    estimate, error = per_group.mean(axis=0), per_group.std(axis=0) / np.sqrt(groups)
    assert np.all(np.abs(estimate - truth) < 4 * error), (estimate, truth, error)

    # The per-turn mean over the episodes that reached k *including* i: biased.
    returns_NK = credit.discounted_returns(rewards_NK + np.eye(3)[turns_N - 1] * final_N[:, None], gamma)
    returns_GSK = np.where(reached_NK, returns_NK, 0.0).reshape(groups, group_size, -1)
    count_G1K = reached_NK.reshape(groups, group_size, -1).sum(axis=1, keepdims=True)
    naive_NK = (returns_GSK - returns_GSK.sum(axis=1, keepdims=True) / np.maximum(count_G1K, 1)).reshape(adv_NK.shape)
    per_group = _gradient_terms(naive_NK, actions_NK, reached_NK, pi_KA, group_size)
    naive, naive_error = per_group.mean(axis=0), per_group.std(axis=0) / np.sqrt(groups)
    assert np.max(np.abs(naive - truth) / naive_error) > 8
    # At turn 0 every episode takes part: exactly the (n - 1) / n shrinkage in expectation.
    np.testing.assert_allclose(naive[0], truth[0] * (group_size - 1) / group_size, atol=4 * naive_error[0].max())


def test_token_advantages_follow_the_turns_of_the_mask():
    mask = np.array([[0, 0, 1, 1, 0, 0, 1, 0, 0],   # two turns
                     [0, 1, 1, 1, 1, 0, 0, 0, 0],   # one turn
                     [0, 0, 0, 0, 0, 0, 0, 0, 0]], bool)  # never sampled
    adv = np.array([[1.5, -2.0], [0.5, 9.0], [3.0, 3.0]])
    out = credit.token_advantages(adv, mask)
    np.testing.assert_array_equal(out, [[0, 0, 1.5, 1.5, 0, 0, -2, 0, 0], [0, .5, .5, .5, .5, 0, 0, 0, 0], [0] * 9])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(credit.turn_index(mask)[0], [-1, -1, 0, 0, -1, -1, 1, -1, -1])
    with pytest.raises(ValueError, match="2 model-token runs"):
        credit.token_advantages(adv[:, :1], mask)


def test_record_turn_reward_and_gathering_them():
    state = {"prompt_length": 1}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"},
                {"role": "user", "content": "r"}, {"role": "assistant", "content": "y"}]
    record_turn_reward(state, 1.0, messages=messages)   # turn 1, turn 0 padded with 0
    record_turn_reward(state, 0.5, messages=messages)   # the same turn: they add up
    record_turn_reward(state, 2.0, turn=0)
    assert state["turn_rewards"] == [2.0, 1.5]
    with pytest.raises(ValueError, match="needs the turn"):
        record_turn_reward(state, 1.0)
    with pytest.raises(ValueError, match="not finite"):
        record_turn_reward(state, NAN, turn=0)
    states = [state, {}, {"turn_rewards": [0.0, 0.0, 0.0]}]
    np.testing.assert_array_equal(turn_rewards_from_states(states, [3, 1, 1], 3),
                                  [[2.0, 1.5, 0.0], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="2 turns but a reward for turn 2"):
        turn_rewards_from_states([{"turn_rewards": [0.0, 0.0, 1.0]}], [2], 3)


TABLES = [{"a": 1.0, "b": 0.0, "stop": 0.5}, {"a": 0.0, "b": 2.0}]


def test_turn_bandit_episodes_give_their_turn_rewards_and_advantages():
    env = make_env("turn_bandit")
    assert isinstance(env, TurnBanditEnv) and env.max_turns == 2
    scripts = {"r0": ["a", "b"], "r1": ["Stop."], "r2": ["b", "a"], "r3": ["a", "zzz"]}
    rows = [{"question": q, "info": {"rewards": TABLES}} for q in scripts]

    def policy(messages):
        return scripts[messages[1]["content"]][sum(m["role"] == "assistant" for m in messages)]

    episodes = run_episodes(env, rows, policy)
    turns = [env.num_turns(e.messages, e.state) for e in episodes]
    assert turns == [2, 1, 2, 2]
    turn_rewards = turn_rewards_from_states([e.state for e in episodes], turns, env.max_turns)
    np.testing.assert_array_equal(turn_rewards, [[1, 0], [0, 0], [0, 0], [1, 0]])
    final = env.score_episodes(episodes).rewards
    np.testing.assert_array_equal(final, [2.0, 0.5, 0.0, 0.0])
    # Returns G: (3, 2), (0.5,), (0, 0), (1, 0); leave-one-out baselines per turn.
    adv = credit.turn_advantages(turn_rewards, turns, final, 4, scale="none")
    np.testing.assert_allclose(adv, [[3 - 1.5 / 3, 2 - 0.0], [0.5 - 4 / 3, 0.0],
                                     [0 - 4.5 / 3, 0 - 1.0], [1 - 3.5 / 3, 0 - 1.0]], rtol=1e-6)
    # The gold episode is the optimal one: a (1) then b (2).
    assert best_picks(TABLES) == ["a", "b"] and best_picks(TABLES, discount=0.2) == ["a", "b"]
    assert best_picks([{"a": 0.0, "stop": 1.0}, {"a": 0.5}]) == ["stop"]
    gold = replay_episodes(env, rows[:1], [env.gold_completion(rows[0])])[0]
    assert gold.state["turn_rewards"] == [1.0] and env.score_episodes([gold]).rewards[0] == 2.0
    generated = env.dataset("train", n=3, seed=0)
    assert generated == env.dataset("train", n=3, seed=0) and len(generated[0]["info"]["rewards"]) == 2
