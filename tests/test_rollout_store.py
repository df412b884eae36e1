"""`grpo_jax.rollout_store`: a run's episodes stored per step, read back, re-scored, compared."""

import gzip
import logging
import math
import os

import numpy as np
import pytest

from grpo_jax import components, rollout_store, trainer
from grpo_jax.advantages import group_advantages
from grpo_jax.metrics import read_metrics
from grpo_jax.rubrics.rubric import Rubric
from grpo_jax.trajectories import pack_episodes
from config_fixtures import load_config


# ---------------------------------------------------------------------------------------------
# A hand-made batch: 4 groups of 3, rewarded by length (stored), re-scored by correctness.

ANSWERS = ["1", "2", "9", "5"]
TEXTS = [["1", "22222", "33"],      # long wrong answers were preferred: flips on 0 and 1
         ["a2", "b2", "c3"],        # equal lengths (no variance) -> correctness varies (gained)
         ["1", "22", "333"],        # lengths vary -> all wrong (lost)
         ["55555", "1", "22"]]      # the long one is also the correct one: nothing changes
GROUP = 3


def length(text) -> float:
    return len(text) / 10


def correct(text, answer) -> float:
    return float(text.endswith(answer))


def _rollout():
    episodes = []
    for answer, texts in zip(ANSWERS, TEXTS):
        for text in texts:
            tokens = [7, 8] + [ord(ch) for ch in text] + [9]
            mask = [0, 0] + [1] * len(text) + [0]
            state = {"answer": answer, "info": {"id": answer}, "task": "toy", "prompt_length": 1,
                     "count": np.int64(3), "value": np.float32(0.5), "array": np.arange(2),
                     "pair": (1, 2), "handle": object()}
            episodes.append({"tokens": tokens, "mask": mask, "logprobs": [0.0] * len(tokens),
                             "prompt": [{"role": "user", "content": "q"}],
                             "completion": [{"role": "assistant", "content": text}], "state": state,
                             "finish_reason": "completed", "num_turns": 1})
    return pack_episodes(episodes, group_size=GROUP, pad_id=0, length_multiple=8)


def _store_toy(workdir, step=1):
    rollout = _rollout()
    old = Rubric([length], isolation="thread").score(
        rollout.prompts, rollout.completions, [s["answer"] for s in rollout.states], rollout.states)
    advantages = group_advantages(np.asarray(old.rewards, np.float32), GROUP)
    path = rollout_store.write_step(str(workdir), step, rollout, old, advantages)
    return rollout, old, np.asarray(advantages), path


def test_write_read_round_trip(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rollout_store"):
        rollout, old, advantages, path = _store_toy(tmp_path)
    assert path == os.path.join(tmp_path, "rollouts", "step_000001.p0.jsonl.gz")
    assert "12 state values were not JSON-serialisable" in caplog.text
    assert os.listdir(os.path.dirname(path)) == ["step_000001.p0.jsonl.gz"]  # no temporary left
    episodes = rollout_store.read_rollouts(str(tmp_path))
    assert len(episodes) == 12 and rollout_store.read_rollouts(str(tmp_path), step=2) == []
    e = episodes[4]
    assert (e.step, e.process, e.episode, e.group, e.group_size) == (1, 0, 4, 1, 3)
    assert (e.answer, e.info, e.task) == ("2", {"id": "2"}, "toy")
    assert e.state["count"] == 3 and e.state["value"] == 0.5 and e.state["array"] == [0, 1]
    assert e.state["pair"] == [1, 2] and "handle" not in e.state and e.dropped == ["handle"]
    assert e.completion == [{"role": "assistant", "content": "b2"}] and e.finish_reason == "completed"
    length_ = int(rollout.lengths[4])
    assert e.tokens == rollout.tokens[4, :length_].tolist() and e.width == rollout.tokens.shape[1]
    np.testing.assert_array_equal(e.mask(e.width), rollout.completion_mask[4])
    assert e.mask_spans == [[2, 4]]
    assert [x.reward for x in episodes] == old.rewards.tolist()
    assert [x.scores["length"] for x in episodes] == old.scores["length"].tolist()
    np.testing.assert_array_equal([x.advantage for x in episodes], advantages)


def test_rescore_with_the_same_rubric_changes_nothing(tmp_path):
    _, old, advantages, _ = _store_toy(tmp_path)
    report = rollout_store.rescore(rollout_store.read_rollouts(str(tmp_path)),
                                   Rubric([length], isolation="thread"), group_size=GROUP)
    np.testing.assert_array_equal(report.rewards, old.rewards)
    np.testing.assert_array_equal(report.advantages, advantages)
    assert report.best_changed_frac == 0 and len(report.sign_flips) == 0
    assert len(report.lost_variance) == len(report.gained_variance) == 0
    assert report.summary()["reward_max_abs_diff"] == 0.0


def test_rescore_with_correctness_reports_the_changes(tmp_path):
    _store_toy(tmp_path)
    report = rollout_store.rescore(rollout_store.read_rollouts(str(tmp_path)),
                                   Rubric([correct], isolation="thread"), group_size=GROUP, correct_fn="correct")
    np.testing.assert_array_equal(report.rewards, [1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0])
    assert report.best_changed.tolist() == [True, True, True, False]
    assert report.best_changed_frac == 0.75
    assert report.sign_flips.tolist() == [0, 1]
    assert report.lost_variance.tolist() == [2] and report.gained_variance.tolist() == [1]
    # Groups where correctness varies: 0, 1, 3. The length reward's group-centred signs match
    # correctness's on episode 2 of group 0 and on all of group 3: 4 of 9.
    assert report.agreement["correct"]["sign_accuracy"] == 1.0
    assert report.agreement["correct"]["spearman"] == pytest.approx(1.0)
    assert report.agreement["stored_reward"]["sign_accuracy"] == pytest.approx(4 / 9)
    summary = report.summary()
    assert summary["sign_flip_frac"] == 2 / 12 and summary["lost_variance_frac"] == 0.25
    assert summary["agreement/stored_reward/sign_accuracy"] == pytest.approx(4 / 9)


def test_rescore_needs_whole_groups(tmp_path):
    _store_toy(tmp_path)
    episodes = rollout_store.read_rollouts(str(tmp_path))
    with pytest.raises(ValueError, match="needs 3 episodes"):
        rollout_store.rescore(episodes[1:], Rubric([correct], isolation="thread"), group_size=GROUP)


def test_corrupt_file_raises_naming_it_or_is_skipped(tmp_path, caplog):
    _store_toy(tmp_path, step=1)
    _, _, _, path = _store_toy(tmp_path, step=2)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:  # a torn copy (not what write_step leaves: it renames whole files)
        f.write(data[:len(data) // 2])
    with pytest.raises(rollout_store.RolloutStoreError, match="step_000002.p0.jsonl.gz"):
        rollout_store.read_rollouts(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rollout_store"):
        kept = rollout_store.read_rollouts(str(tmp_path), on_error="skip")
    assert {e.step for e in kept} == {1} and len(kept) == 12 and "step_000002" in caplog.text
    with gzip.open(path, "wt") as f:
        f.write("not json\n")
    with pytest.raises(rollout_store.RolloutStoreError, match=r"step_000002.p0.jsonl.gz \(line 1\)"):
        rollout_store.read_rollouts(str(tmp_path), step=2)


def test_rewind_drops_later_steps_and_temporaries(tmp_path):
    for step in (1, 2, 3):
        _store_toy(tmp_path, step=step)
    open(os.path.join(tmp_path, "rollouts", "step_000004.p0.jsonl.gz.tmp-1"), "w").close()
    rollout_store.rewind(str(tmp_path), 1)
    assert sorted(os.listdir(os.path.join(tmp_path, "rollouts"))) == ["step_000001.p0.jsonl.gz"]
    rollout_store.rewind(str(tmp_path), None)
    assert rollout_store.read_rollouts(str(tmp_path)) == []


# ---------------------------------------------------------------------------------------------
# A real run: one file per step, and re-scoring reproduces the train-time scores.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = load_config("calculator_tiny")
    workdir = str(tmp_path_factory.mktemp("run"))
    trainer.run(config, workdir)
    return config, workdir


def test_run_stores_one_file_per_step(trained):
    config, workdir = trained
    steps = list(range(1, config.train.num_steps + 1))
    assert sorted(os.listdir(os.path.join(workdir, "rollouts"))) == [f"step_{s:06d}.p0.jsonl.gz" for s in steps]
    rows = {r["step"]: r for r in read_metrics(workdir) if "loss" in r}
    per_step = config.train.prompts_per_step * config.rollout.group_size
    for step in steps:
        episodes = rollout_store.read_rollouts(workdir, step)
        assert [e.episode for e in episodes] == list(range(per_step))
        assert all(e.answer is not None and e.task for e in episodes)
        rewards = np.array([e.reward for e in episodes])
        assert np.nanmean(rewards) == pytest.approx(rows[step]["reward"], rel=1e-12)
        for name in episodes[0].scores:
            assert np.nanmean([e.scores[name] for e in episodes]) == pytest.approx(rows[step][f"reward/{name}"])
        advantages = group_advantages(rewards.astype(np.float32), config.rollout.group_size,
                                      config.grpo.advantage_scale)
        np.testing.assert_allclose([e.advantage for e in episodes], advantages, rtol=1e-6, atol=1e-6)


def test_rescoring_stored_rollouts_equals_scoring_them_at_train_time(trained):
    config, workdir = trained
    env = components.build_env(config.env)
    episodes = rollout_store.read_rollouts(workdir)
    report = rollout_store.rescore(episodes, env, group_size=config.rollout.group_size,
                                   advantage_scale=config.grpo.advantage_scale, correct_fn="correct_answer")
    np.testing.assert_array_equal(report.rewards, report.stored_rewards)
    for name, values in report.scores.scores.items():
        np.testing.assert_array_equal(values, [e.scores[name] for e in report.episodes])
    np.testing.assert_allclose(report.advantages, report.stored_advantages, rtol=1e-6, atol=1e-6)
    assert report.best_changed_frac == 0 and len(report.sign_flips) == 0
    assert len(report.lost_variance) == len(report.gained_variance) == 0
    # The rubric itself (answer, info and task from the stored rows) scores the same.
    same = rollout_store.rescore(episodes, env.rubric, group_size=config.rollout.group_size)
    np.testing.assert_array_equal(same.rewards, report.stored_rewards)
    # Correctness alone: the comparison is that of the stored numbers, recomputed by hand.
    only = rollout_store.rescore(episodes, env.rubric.reweighted(
        {n: (1.0 if n == "correct_answer" else 0.0) for n in env.rubric.names}),
        group_size=config.rollout.group_size, correct_fn="correct_answer")
    correct = np.array([e.scores["correct_answer"] for e in only.episodes])
    np.testing.assert_array_equal(only.rewards, correct)
    old_GS = only.stored_rewards.reshape(-1, config.rollout.group_size)
    new_GS = correct.reshape(-1, config.rollout.group_size)
    lost = [g for g in range(len(old_GS)) if np.ptp(old_GS[g]) > 0 and np.ptp(new_GS[g]) == 0]
    assert only.lost_variance.tolist() == lost
    assert all(math.isclose(only.agreement["correct_answer"][k], 1.0) for k in ("spearman", "sign_accuracy")
               if not math.isnan(only.agreement["correct_answer"][k]))
