"""Packed train batches: several episodes per row give the loss, metrics and update of the same
episodes one per row, for every loss type; and the packing itself (first fit, segments, buckets).

The step programs are compiled with test_train_step's FAST options (no LLVM optimisation).
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from test_train_step import FAST, MODEL, _max_diff

from grpo_jax import grpo, packing
from grpo_jax import train_step as ts
from grpo_jax.models import abstract_model, create_model
from grpo_jax.trajectories import pack_episodes

WIDTH = 32
SGD = optax.sgd(1.0)  # the update is the gradient


def _episodes(seed=0, n=10):
    """`n` episodes of 4..17 tokens: prompt (mask 0) + completion (1); episode 2 is prompt-only,
    episode 6 truncated (its loss mask zeroed: an empty sequence), episode 5 an agent episode of
    two attention segments (positions restart in the second)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt, completion = int(rng.integers(2, 5)), int(rng.integers(2, 14))
        if i == 2:
            completion = 0
        length = prompt + completion
        episode = {"tokens": rng.integers(1, MODEL.vocab_size, length).tolist(),
                   "mask": [0] * prompt + [1] * completion,
                   "logprobs": (-3.4 + 0.4 * rng.standard_normal(length)).tolist(),
                   "prompt": [], "completion": [], "state": {}, "num_turns": 1,
                   "finish_reason": "length" if i == 6 else "completed"}
        if i == 5:
            episode["segments"] = [length // 2, length - length // 2]
        out.append(episode)
    return out


def _rollout(seed=0):
    return pack_episodes(_episodes(seed), group_size=2, pad_id=0, length_multiple=4, mask_truncated=True)


def _unpacked_batch(rollout, advantages):
    return {"tokens": rollout.tokens, "positions": rollout.positions, "segment_ids": rollout.segment_ids,
            "loss_mask": rollout.loss_mask, "old_logps": rollout.logprobs, "advantages": advantages}


# ---------------------------------------------------------------------------------------------
# The loss of packed rows (no model): per (row, sequence id) quantities.
# ---------------------------------------------------------------------------------------------

def _fake_logps(tokens, positions):
    """A deterministic 'policy': depends on the token and its position in its episode only."""
    return (-1.0 - 0.05 * tokens - 0.02 * positions).astype(np.float32)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_packed_loss_equals_unpacked_loss_for_every_type(loss_type):
    rollout = _rollout()
    advantages = np.random.default_rng(1).standard_normal(len(rollout)).astype(np.float32)
    packed, _ = packing.pack_rollout(rollout, advantages, width=WIDTH, row_multiple=2)
    kwargs = dict(loss_type=loss_type, max_completion_length=40, epsilon_high=0.28, beta=0.1,
                  importance_sampling_level="sequence" if loss_type == "dapo" else "token")
    loss_u, metrics_u = grpo.policy_loss(
        _fake_logps(rollout.tokens, rollout.positions)[:, 1:], rollout.logprobs[:, 1:], advantages,
        rollout.loss_mask[:, 1:], ref_logps=rollout.logprobs[:, 1:] + 0.1, **kwargs)
    ids = packed["sequence_ids"]
    logps = _fake_logps(packed["tokens"], packed["positions"])[:, 1:]
    args = (logps, packed["old_logps"][:, 1:], packed["advantages"][:, 1:], packed["loss_mask"][:, 1:])
    ref = packed["old_logps"][:, 1:] + 0.1
    loss_p, metrics_p = grpo.policy_loss(*args, ref_logps=ref, sequence_ids=ids[:, 1:], **kwargs)
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
    assert metrics_p.keys() == metrics_u.keys()
    for name in metrics_u:
        np.testing.assert_allclose(metrics_p[name], metrics_u[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert int(metrics_p["num_sequences"]) == 8  # the prompt-only and the truncated episode are empty
    # (sum, count) over row micro-batches of the packed batch: the full batch's loss.
    total = 0.0
    for lo, hi in ((0, 1), (1, len(ids))):
        part = [x[lo:hi] for x in args]
        total += grpo.policy_loss_sum(*part, ref_logps=ref[lo:hi], sequence_ids=ids[lo:hi, 1:], **kwargs)[0]
    normalizer = grpo.loss_normalizer(args[3], loss_type, 40, sequence_ids=ids[:, 1:])
    np.testing.assert_allclose(grpo.finalize_loss(total, normalizer), loss_u, rtol=1e-5)


def test_dr_grpo_counts_every_episode_and_grpo_the_non_empty_ones():
    rollout = _rollout()
    packed, _ = packing.pack_rollout(rollout, np.zeros(len(rollout)), width=WIDTH)
    ids, mask = packed["sequence_ids"][:, 1:], packed["loss_mask"][:, 1:]
    assert len(ids) < len(rollout)  # rows hold several episodes
    assert float(grpo.loss_normalizer(mask, "dr_grpo", 10, sequence_ids=ids)) == 10 * len(rollout)
    assert float(grpo.loss_normalizer(mask, "grpo", sequence_ids=ids)) == len(rollout) - 2
    assert float(grpo.loss_normalizer(mask, "dapo", sequence_ids=ids)) == rollout.loss_mask[:, 1:].sum()


# ---------------------------------------------------------------------------------------------
# The train step: packed == unpacked (loss, metrics, gradient), every loss type.
# ---------------------------------------------------------------------------------------------

_STEPS = {}


def _step(cfg):
    if cfg not in _STEPS:
        _STEPS[cfg] = ts.make_train_step(abstract_model(MODEL), SGD, cfg, compiler_options=FAST)
    return _STEPS[cfg]


def _run(cfg, batch, ref):
    state = ts.init_train_state(create_model(MODEL, 0), SGD, jax.random.key(0))
    return _step(cfg)(state, batch, ref)


CASES = {  # loss type -> (settings, packed micro-batch rows); together: every option once
    "grpo": (dict(), 2),                                            # two micro-batches
    "bnpo": (dict(use_sampler_logps_as_old=False, tis_cap=1.5), None),  # recomputed old + TIS
    "dr_grpo": (dict(beta=0.1, max_completion_length=16), None),    # KL to a reference
    "dapo": (dict(epsilon_high=0.28, importance_sampling_level="sequence"), None),
    "gspo": (dict(epsilon=0.02, epsilon_high=0.03), None),
    "cispo": (dict(epsilon_high=0.5), 2),
}


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_packed_step_gives_the_unpacked_update(loss_type):
    settings, micro = CASES[loss_type]
    rollout = _rollout(seed=3)
    advantages = np.random.default_rng(4).standard_normal(len(rollout)).astype(np.float32)
    packed, stats = packing.pack_rollout(rollout, advantages, width=WIDTH, row_multiple=micro or 1)
    assert stats["train/rows"] < len(rollout) and stats["train/padding_frac"] < stats["train/padding_frac_unpacked"]
    ref = nnx.split(create_model(MODEL, 9), nnx.Param, ...)[1] if settings.get("beta") else None
    base = ts.TrainConfig(loss_type=loss_type, **settings)
    state_u, m_u = _run(base, _unpacked_batch(rollout, advantages), ref)
    state_p, m_p = _run(ts.TrainConfig(loss_type=loss_type, micro_batch_size=micro, **settings), packed, ref)
    start = nnx.split(create_model(MODEL, 0), nnx.Param, ...)[1]
    assert _max_diff(state_u.params, start) > 1e-4  # the update is real
    assert _max_diff(state_p.params, state_u.params) < 1e-5
    assert m_p.keys() == m_u.keys()
    for name in m_u:
        np.testing.assert_allclose(m_p[name], m_u[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert int(m_p["num_sequences"]) == 8 and int(m_p["num_tokens"]) == int(rollout.loss_mask[:, 1:].sum())


# ---------------------------------------------------------------------------------------------
# The packing itself.
# ---------------------------------------------------------------------------------------------

def test_first_fit_decreasing():
    assert packing.first_fit([5, 9, 3, 7, 2], 10) == [[1], [3, 2], [0, 4]]
    assert packing.first_fit([4, 4, 4], 12) == [[0, 1, 2]]
    assert packing.first_fit([], 8) == []
    with pytest.raises(ValueError, match="episode 1 has 11 tokens"):
        packing.first_fit([5, 11], 10)


def test_segments_are_renumbered_per_row_and_positions_kept():
    rollout = _rollout()
    packed, stats = packing.pack_rollout(rollout, np.arange(len(rollout), dtype=np.float32), width=WIDTH)
    plan = packing.first_fit(rollout.lengths, WIDTH)
    for r, members in enumerate(plan):
        offset, segments = 0, 0
        for k, i in enumerate(members, start=1):
            n = int(rollout.lengths[i])
            span = slice(offset, offset + n)
            np.testing.assert_array_equal(packed["tokens"][r, span], rollout.tokens[i, :n])
            np.testing.assert_array_equal(packed["positions"][r, span], rollout.positions[i, :n])
            np.testing.assert_array_equal(packed["segment_ids"][r, span], rollout.segment_ids[i, :n] + segments)
            assert (packed["sequence_ids"][r, span] == k).all() and (packed["advantages"][r, span] == i).all()
            assert packed["loss_mask"][r, offset] == 0
            segments += int(rollout.segment_ids[i].max())
            offset += n
        assert (packed["segment_ids"][r, offset:] == 0).all() and (packed["sequence_ids"][r, offset:] == 0).all()
    # The agent episode (5) keeps its two segments, its positions restarting in the second.
    row = next(r for r, m in enumerate(plan) if 5 in m)
    ids = packed["segment_ids"][row][packed["sequence_ids"][row] == plan[row].index(5) + 1]
    assert len(set(ids.tolist())) == 2
    real = int(rollout.lengths.sum())
    assert stats == {"train/padding_frac": 1 - real / (len(plan) * WIDTH),
                     "train/padding_frac_unpacked": 1 - real / rollout.tokens.size,
                     "train/rows": float(len(plan))}
    with pytest.raises(ValueError, match=r"episode \d+ has \d+ tokens, more than the packed row width 8"):
        packing.pack_rollout(rollout, np.zeros(len(rollout)), width=8)


def test_per_token_advantages_are_copied_into_each_span():
    rollout = _rollout()
    n, t = rollout.tokens.shape
    advantages = np.arange(n * t, dtype=np.float32).reshape(n, t) / 7  # a distinct value per token
    packed, _ = packing.pack_rollout(rollout, advantages, width=WIDTH)
    for r, members in enumerate(packing.first_fit(rollout.lengths, WIDTH)):
        offset = 0
        for i in members:
            length = int(rollout.lengths[i])
            np.testing.assert_array_equal(packed["advantages"][r, offset:offset + length], advantages[i, :length])
            offset += length
        assert (packed["advantages"][r, offset:] == 0).all()
    per_episode, _ = packing.pack_rollout(rollout, advantages[:, 0], width=WIDTH)  # [N] as before
    broadcast, _ = packing.pack_rollout(rollout, np.repeat(advantages[:, :1], t, axis=1), width=WIDTH)
    np.testing.assert_array_equal(per_episode["advantages"], broadcast["advantages"])
    with pytest.raises(ValueError, match=r"or \[N, T\]"):
        packing.pack_rollout(rollout, advantages[:, :-1], width=WIDTH)


def test_row_counts_are_bucketed_and_padded_with_empty_rows():
    assert [packing.bucket_rows(r) for r in (1, 2, 3, 4, 5, 8, 9, 17, 33, 100)] == [1, 2, 3, 4, 5, 8, 9, 18, 36, 104]
    assert packing.bucket_rows(3, 4) == 4 and packing.bucket_rows(13, 4) == 16 and packing.bucket_rows(9, 2) == 10 and packing.bucket_rows(9, 1, limit=9) == 9
    sizes = {packing.bucket_rows(r) for r in range(1, 257)}
    assert len(sizes) == 15 + 8 * 4 + 1  # 1..15, then eight per octave
    assert all(r <= packing.bucket_rows(r) <= 1.125 * r for r in range(1, 257))
    assert packing.row_multiple(4, 6, processes=2) == 6 and packing.row_multiple(8, None) == 8
    rollout = _rollout()
    packed, stats = packing.pack_rollout(rollout, np.ones(len(rollout)), width=WIDTH, row_multiple=4)
    assert len(packed["tokens"]) == stats["train/rows"] == 4
    more = packing.pad_rows(packed, 6, pad_id=0)
    assert len(more["tokens"]) == 6 and not more["loss_mask"][4:].any() and not more["sequence_ids"][4:].any()
    with pytest.raises(ValueError, match="fewer than"):
        packing.pack_rollout(rollout, np.ones(len(rollout)), width=WIDTH, rows=1)


# ---------------------------------------------------------------------------------------------
# The config: packed micro-batches, the output head's bound, the memory plan's shape.
# ---------------------------------------------------------------------------------------------

def test_packed_config_sets_micro_batch_rows_and_the_memory_plan_describes_them():
    import types

    from grpo_jax import config_utils
    from grpo_jax.memory import plan_for_run
    from grpo_jax.models.config import ModelConfig

    c = config_utils.default_config()
    c.grpo.micro_batch_tokens = 1000  # 1000 // 192 = 5 rows of rollout.max_seq_len = 192
    train = config_utils.train_config(c)
    assert (train.micro_batch_size, train.max_loss_tokens) == (5, None)
    c.grpo.pack, c.grpo.micro_batch_tokens = False, None
    unpacked = config_utils.train_config(c)
    assert unpacked.max_loss_tokens == c.sampling.max_new_tokens * c.rollout.max_turns
    assert unpacked.micro_batch_size is None
    c.grpo.pack = True
    run = types.SimpleNamespace(config=c, model=types.SimpleNamespace(config=ModelConfig()), engine=None,
                                mesh=types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tp": 1}),
                                optimizer="adamw", uses_reference=False, train=train)
    assert "ESTIMATE for 5 x 192 tokens" in plan_for_run(run).notes["activations"]
    c.grpo.micro_batch_size, c.grpo.micro_batch_tokens = 8, 1000  # one of them, not both
    with pytest.raises(config_utils.ConfigError, match="grpo.micro_batch_tokens: and grpo.micro_batch_size both"):
        config_utils.validate(c)


def test_first_fit_keeps_rows_within_the_segment_bound():
    from grpo_jax.packing import first_fit
    rows = first_fit([4] * 10, width=100, segments=[3] * 10, max_segments=7)
    assert [len(r) for r in rows] == [2] * 5  # 2 x 3 segments fit in 7, a third does not
    assert first_fit([4] * 10, width=100) == [list(range(10))]
