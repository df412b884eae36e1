"""The live reward-hack monitor (`grpo_jax.rubrics.monitor`): each detector fires on the episodes
built to trip it and not on honest ones; the trend check needs reward up AND correctness down."""

import math

import pytest

from grpo_jax.rubrics.monitor import HackMonitor

HONEST = "<calc>2*3</calc>\n<answer>6</answer>"


def test_honest_episodes_raise_nothing():
    metrics, alerts = HackMonitor().check(1, [HONEST] * 4, [1.2] * 4, [1.0] * 4, eval_accuracy=1.0)
    assert alerts == [] and metrics["hack/alerts"] == 0
    assert all(v == 0 for k, v in metrics.items())


@pytest.mark.parametrize("text, detector", [
    ("<answer>6</answer><answer>7</answer><answer>8</answer>", "several_answers"),
    ("<answer> </answer>", "empty_answer"),
    ("the answer is\n" + "6\n" * 8, "repeated_text"),
])
def test_each_detector_fires_on_its_hack(text, detector):
    texts = [text] * 3 + [HONEST]
    metrics, alerts = HackMonitor().check(3, texts, [1.0] * 4, [1.0] * 4, eval_accuracy=None)
    assert metrics[f"hack/{detector}"] == pytest.approx(0.75)
    assert any(a.startswith(detector) for a in alerts)


def test_a_hackable_rubric_is_flagged_from_the_rollouts():
    """Reward for the answer tag alone: the policy writes tags with wrong answers, gets paid."""
    texts = ["<answer>41</answer>"] * 6 + [HONEST] * 2
    rewards = [0.6] * 6 + [1.2] * 2
    correct = [0.0] * 6 + [1.0] * 2
    metrics, alerts = HackMonitor().check(5, texts, rewards, correct, eval_accuracy=None)
    assert metrics["hack/rewarded_but_wrong"] == pytest.approx(0.75)
    assert any(a.startswith("rewarded_but_wrong") for a in alerts)


def test_the_trend_needs_reward_up_and_correctness_down():
    monitor = HackMonitor()
    monitor.check(0, [HONEST], [0.5], [1.0], eval_accuracy=0.8)
    metrics, alerts = monitor.check(10, [HONEST], [0.9], [1.0], eval_accuracy=0.9)  # both up: fine
    assert metrics["hack/reward_up_correctness_down"] == 0 and not alerts
    metrics, alerts = monitor.check(20, [HONEST], [1.3], [1.0], eval_accuracy=0.5)  # up, down: alert
    assert metrics["hack/reward_up_correctness_down"] == 1 and "reward_up_correctness_down" in alerts[0]
    metrics, _ = monitor.check(30, [HONEST], [math.nan], [1.0], eval_accuracy=0.4)  # no finite reward
    assert metrics["hack/reward_up_correctness_down"] == 0


def says_something(text) -> float:
    """A hackable reward: anything written pays (no correctness at all)."""
    return float(bool(text.strip()))


def test_a_hackable_rubric_is_flagged_during_a_short_run(tmp_path, caplog):
    """The default task's smoke variant with a rubric that pays for any text (correctness
    logged at weight 0): its barely trained policy writes wrong answers and is paid for them, and
    the evaluation's monitor says so in metrics.jsonl and the log."""
    import logging

    from config_fixtures import load_config

    from grpo_jax import trainer
    from grpo_jax.metrics import read_metrics
    config = load_config("calculator_tiny")
    with config.unlocked():
        config.env.rubric.funcs = {"says_something": {"weight": 1.0, "fn": "test_monitor:says_something"},
                                   "correct_answer": 0.0}
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rubrics.monitor"):
        trainer.run(config, str(tmp_path))
    rows = [r for r in read_metrics(str(tmp_path)) if "hack/alerts" in r]
    assert rows and rows[-1]["step"] == config.train.num_steps
    assert rows[-1]["hack/rewarded_but_wrong"] > 0.2 and rows[-1]["hack/alerts"] >= 1
    assert "rewarded_but_wrong" in caplog.text
