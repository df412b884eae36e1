"""The GRPO variants the loop carries out: dynamic sampling with refill, rollouts overlapping the
update (train.staleness), the reference synced every N steps, per-turn credit and GDPO in the
trainer, and the warm-start cache."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from config_fixtures import VARYING_RUBRIC, load_config
from grpo_jax import collector, config_utils, trainer
from grpo_jax.collector import (Collector, Episodes, _Round, _subset_rollout, _subset_scores, select_groups,
                                varying_groups)
from grpo_jax.components import build
from grpo_jax.metrics import read_metrics
from grpo_jax.rubrics.rubric import RubricScores, score_metrics
from grpo_jax.trajectories import pack_episodes


# ---------------------------------------------------------------------------------------------
# Dynamic sampling: the selection, by hand.


def test_varying_groups_ignore_nan_and_single_valid_rewards():
    rewards = np.array([1, 1, 0, 1, np.nan, 1, np.nan, np.nan, 0.5, 0.5], float)
    np.testing.assert_array_equal(varying_groups(rewards, 2), [False, True, False, False, False])


def test_select_groups_takes_varying_groups_in_round_order_then_fills():
    rounds = [np.array([False, True, False]), np.array([True, True, False])]
    assert select_groups(rounds, 2) == ([(0, 1), (1, 0)], 0)
    assert select_groups(rounds, 3) == ([(0, 1), (1, 0), (1, 1)], 0)
    # Four wanted, three vary: the first group without variance fills the batch.
    assert select_groups(rounds, 4) == ([(0, 0), (0, 1), (1, 0), (1, 1)], 1)


def test_refill_rounds_draw_their_own_rows():
    first = collector.step_rows(50, 3, 8, seed=1)
    again = collector.step_rows(50, 3, 8, seed=1, round_=1)
    np.testing.assert_array_equal(again, collector.step_rows(50, 3, 8, seed=1, round_=1))  # a function of (step, round)
    assert not np.array_equal(first, again) and again.min() >= 0 and again.max() < 50


def _round(rewards, group_size, tag):
    """A `_Round` of one-token-per-episode rollouts whose token ids say (tag, episode)."""
    episodes = [{"tokens": [tag, 100 + i, 7], "mask": [0, 1, 1], "logprobs": [0.0, -1.0, -2.0],
                 "prompt": [{"role": "user", "content": f"{tag}"}], "completion": [],
                 "state": {"task": "t"}, "finish_reason": "completed", "num_turns": 1}
                for i in range(len(rewards))]
    result = pack_episodes(episodes, group_size=group_size, pad_id=0, length_multiple=4)
    rewards = np.asarray(rewards, float)
    scores = RubricScores(rewards, {"f": rewards}, {"f": 0}, {}, score_metrics(rewards, {"f": rewards}, {"f": 0}))
    eps = Episodes(rewards, dict(result.metrics), dict(scores.metrics), result.tokens.shape[1], {"f": rewards},
                   np.zeros((len(rewards), 1)), np.ones(len(rewards), np.int32))
    return _Round(result, scores, eps, 0.1)


def test_dynamic_batch_holds_the_chosen_groups_in_order():
    config = load_config("calculator_tiny")
    with config.unlocked():
        config.train.prompts_per_step = 3
        config.grpo.dynamic_sampling = True
    run = types.SimpleNamespace(config=config, rollout=types.SimpleNamespace(pad_id=0), env=None, mesh=None,
                                train=types.SimpleNamespace(micro_batch_size=None))
    rounds = [_round([1, 1, 0, 1, 0, 0], 2, 1), _round([0, 0, 1, 0, 0.5, 0.5], 2, 2),
              _round([1, 0, 1, 1, 1, 1], 2, 3)]
    selected, local, scores, offset, extra = Collector(run)._select(rounds, step=1)
    # Varying: round 0 group 1, round 1 group 1, round 2 group 0.
    np.testing.assert_array_equal(selected.rewards, [0, 1, 1, 0, 1, 0])
    assert local.tokens[:, :2].tolist() == [[1, 102], [1, 103], [2, 102], [2, 103], [3, 100], [3, 101]]
    np.testing.assert_array_equal(scores.rewards, selected.rewards)
    assert offset.tolist() == list(range(6)) and len(local) == 6
    assert extra["dynamic/rounds"] == 3 and extra["dynamic/groups_varying"] == 3
    assert extra["dynamic/groups_filled"] == 0 and extra["dynamic/batch_reward"] == pytest.approx(0.5)


def test_processes_select_their_own_episodes_of_the_same_batch():
    """Several processes: each holds its block of every round's groups; the selection is made on
    the gathered rewards, and the processes' selected episodes, in process order, are the
    one-process batch's (what each process packs)."""
    config = load_config("calculator_tiny")
    with config.unlocked():
        config.train.prompts_per_step = 4
        config.grpo.dynamic_sampling = True

    def collector_of(block):
        run = types.SimpleNamespace(config=config, rollout=types.SimpleNamespace(pad_id=0), env=None,
                                    mesh=None, train=types.SimpleNamespace(micro_batch_size=None))
        c = Collector(run)
        c.block = block
        return c

    # 4 groups of 2 per round; varying: round 0 groups 1 and 2, round 1 groups 1 and 3. Process 0
    # holds groups 0-1 of each round, process 1 groups 2-3: their episodes interleave in the batch.
    rewards = [[1, 1, 0, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0.5, 0.5, 0, 1]]
    whole = [_round(r, 2, tag) for tag, r in enumerate(rewards, start=1)]
    one = collector_of((0, 4))._select(whole, step=1)
    parts = []
    for block in ((0, 2), (2, 4)):
        rows = np.arange(2 * block[0], 2 * block[1])
        local = [_Round(_subset_rollout([(w.result, rows)], pad_id=0), _subset_scores([(w.scores, rows)]),
                        w.episodes, 0.1) for w in whole]
        parts.append(collector_of(block)._select(local, step=1))
    np.testing.assert_array_equal(parts[0][0].rewards, one[0].rewards)  # every process: the whole batch
    order = np.argsort(np.concatenate([p[3] for p in parts]))  # the processes' episodes in batch order
    np.testing.assert_array_equal(np.concatenate([p[1].tokens for p in parts])[order], one[1].tokens)
    np.testing.assert_array_equal(np.concatenate([p[2].rewards for p in parts])[order], one[2].rewards)
    # Each process's episodes' positions in the batch: round 0 group 1 (0, 1), round 0 group 2 (2, 3),
    # round 1 group 1 (4, 5), round 1 group 3 (6, 7).
    assert [p[3].tolist() for p in parts] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    np.testing.assert_array_equal(np.concatenate([p[3] for p in parts]), [0, 1, 4, 5, 2, 3, 6, 7])
    assert one[3].tolist() == list(range(8))


# ---------------------------------------------------------------------------------------------
# The loop: runs of the runlocal config.


def _config(**fields):
    """The runlocal calculator config, 3 steps, with a reward that varies on its untrained model."""
    config = load_config("calculator_tiny")
    with config.unlocked():
        config.optim.learning_rate = 3e-2  # the runlocal model must move in 3 steps
        config.env.rubric.funcs = VARYING_RUBRIC
        config.env.kwargs.reward_isolation = "thread"
        config.train.num_steps, config.train.eval_every, config.checkpoint.every = 3, 3, 3
        for path, value in fields.items():
            group, name = path.split(".")
            config[group][name] = value
    return config


def _trained(rows):
    return [r for r in rows if "loss" in r]


def test_staleness_zero_is_the_synchronous_loop(tmp_path):
    """k = 0: the trainer's metrics are those of a loop written out here from the public pieces
    (collect from the current weights, then update), bitwise."""
    config = _config(**{"sft.mixed_steps": 0})
    trainer.run(config, str(tmp_path / "run"))
    logged = _trained(read_metrics(str(tmp_path / "run")))

    run = build(config, str(tmp_path / "by_hand"))
    state, collect = run.init_state(), Collector(run)
    for step in (1, 2, 3):
        batch = collect.collect(state.params, step).batch
        state, metrics = run.train_step(state, batch)
        assert float(metrics["loss"]) == logged[step - 1]["loss"]
        assert float(metrics["grad_norm"]) == logged[step - 1]["grad_norm"]
    assert [r["offpolicy/staleness"] for r in logged] == [0.0, 0.0, 0.0]


def test_staleness_one_samples_the_weights_before_the_update(tmp_path):
    """k = 1 (on one device, in a fresh process: tests/staleness_worker.py): step s's episodes
    come from the weights update s - 1 started from, sampled while it ran; the logged gap
    between sampler and trainer log-probs shows the staleness."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "staleness_worker.py"),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    seen, rows = {int(k): v for k, v in out["seen"].items()}, out["rows"]
    assert [r["offpolicy/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert seen[1] == seen[2] != seen[3]  # steps 1 and 2 sampled the start weights, step 3 theta_1
    assert rows[1]["mismatch/logp_abs_diff"] > 100 * rows[0]["mismatch/logp_abs_diff"]
    assert out["last_step"] == 3 and out["devices"] == 1


def test_staleness_refused_where_it_cannot_overlap(tmp_path, monkeypatch):
    config = _config(**{"train.staleness": 1})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(config_utils.ConfigError, match="train.staleness"):
        trainer.run(config, str(tmp_path))


def test_reference_synced_every_two_steps(tmp_path):
    """The reference is the start weights until step 2 ends, then the policy after step 2: the KL
    at the start of update 3 (its first and only iteration) is that of identical weights."""
    config = _config(**{"grpo.beta": 0.1, "grpo.ref_sync_every": 2, "sft.mixed_steps": 0})
    trainer.run(config, str(tmp_path))
    kl = [r["kl"] for r in _trained(read_metrics(str(tmp_path)))]
    assert abs(kl[0]) < 1e-6  # step 1: the start weights are the reference
    assert kl[1] > 1e-5  # step 2: theta_1 against the start weights
    assert abs(kl[2]) < 1e-3 * kl[1]  # step 3: theta_2 against its own copy


def test_dynamic_sampling_refills_then_fills(tmp_path):
    """Rounds run until prompts_per_step groups vary or max_sampling_rounds is reached; then the
    groups without variance fill the batch, counted. Without a varying reward (the runlocal
    model earns none) every step fills its whole batch."""
    config = _config(**{"grpo.dynamic_sampling": True, "grpo.max_sampling_rounds": 3, "sft.mixed_steps": 0})
    trainer.run(config, str(tmp_path / "varying"))
    rows = _trained(read_metrics(str(tmp_path / "varying")))
    for r in rows:
        assert r["dynamic/groups_sampled"] == 4 * r["dynamic/rounds"]
        assert r["dynamic/groups_filled"] == max(0.0, 4 - r["dynamic/groups_varying"])
        assert r["dynamic/rounds"] == 3 or r["dynamic/groups_varying"] >= 4
    assert any(r["dynamic/rounds"] > 1 for r in rows) and any(r["dynamic/groups_filled"] < 4 for r in rows)
    with config.unlocked():
        config.env.rubric.funcs = {}
        config.train.num_steps = 1
    trainer.run(config, str(tmp_path / "constant"))
    rows = _trained(read_metrics(str(tmp_path / "constant")))
    assert [(r["dynamic/rounds"], r["dynamic/groups_filled"]) for r in rows] == [(3.0, 4.0)]


@pytest.mark.parametrize("fields", [{"grpo.multi_reward": "normalize_then_sum"}, {"grpo.credit": "turn"}],
                         ids=["gdpo", "turn_credit"])
def test_advantage_variants_train(tmp_path, fields):
    config = _config(**fields, **{"train.num_steps": 2})
    trainer.run(config, str(tmp_path))
    rows = _trained(read_metrics(str(tmp_path)))
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[0]["grad_norm"] > 0  # the first step's rewards vary: a real update


def test_bad_variant_settings_name_the_field():
    for path, value in (("grpo.credit", "step"), ("grpo.multi_reward", "max"), ("grpo.turn_discount", 0.0),
                        ("grpo.max_sampling_rounds", 0), ("train.staleness", -1), ("grpo.ref_sync_every", -2)):
        config = _config(**{path: value})
        with pytest.raises(config_utils.ConfigError, match=path.replace(".", r"\.")):
            config_utils.validate(config)


# ---------------------------------------------------------------------------------------------
# The warm-start cache.


def test_warm_start_cache_gives_the_same_run_and_serves_other_grpo_seeds(tmp_path, capsys):
    """A cache hit gives the metrics of the run that warm-started; with `sft.seed` fixed, a run of
    another `seed` starts GRPO from the same weights (the same evaluation before GRPO) and
    differs after (other sampling keys)."""
    config = _config(**{"sft.cache_dir": str(tmp_path / "cache"), "train.num_steps": 2})
    trainer.run(config, str(tmp_path / "a"))
    assert "warm start kept in" in capsys.readouterr().out
    trainer.run(config, str(tmp_path / "b"))
    assert "warm start read from" in capsys.readouterr().out

    def comparable(workdir):
        return [{k: v for k, v in r.items() if not k.startswith(trainer.TIMING_PREFIXES)}
                for r in read_metrics(workdir) if not any(k.startswith("sft/") for k in r)]

    assert comparable(str(tmp_path / "a")) == comparable(str(tmp_path / "b"))
    with config.unlocked():
        config.seed, config.sft.seed = 1, 0
    trainer.run(config, str(tmp_path / "c"))
    assert "warm start read from" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "cache")) == 1
    a, c = comparable(str(tmp_path / "a")), comparable(str(tmp_path / "c"))
    assert a[0] == c[0] and a[0]["step"] == 0 and "eval/accuracy" in a[0]  # the same start
    assert _trained(a)[0]["loss"] != _trained(c)[0]["loss"]


def test_mini_batches_that_do_not_split_an_unpacked_batch_are_refused():
    config = _config(**{"grpo.pack": False, "grpo.num_mini_batches": 3})  # 4 prompts x 2 = 8 rows
    with pytest.raises(config_utils.ConfigError, match=r"grpo\.num_mini_batches"):
        config_utils.validate(config)
