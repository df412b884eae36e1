"""Environments from config: datasets (jsonl / hf / tfds), rubrics, groups, a plug-in trained by the CLI."""

import json
import os
import subprocess
import sys
import types

import pytest

from grpo_jax import components, config_utils
from grpo_jax.envs import EnvGroup, SingleTurnEnv, datasets, registry
from grpo_jax.rubrics import answer_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the examples/ plug-in, as PYTHONPATH=. gives it to the CLI


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _single_turn_config(tmp_path):
    c = config_utils.default_config()
    c.env.name = "single_turn"
    c.env.kwargs.system_prompt = "Answer in <answer></answer>."
    c.env.kwargs.reward_isolation = "thread"
    c.env.dataset.type = "jsonl"
    c.env.dataset.train = _write_jsonl(tmp_path / "train.jsonl",
                                       [{"q": f"{i} + 1?", "a": i + 1, "src": "mine"} for i in range(10)])
    c.env.dataset.test = _write_jsonl(tmp_path / "test.jsonl", [{"q": "7 + 7?", "a": 14, "src": "t"}])
    c.env.dataset.question, c.env.dataset.answer, c.env.dataset.info = "q", "a", ("src",)
    c.env.rubric.funcs = {
        "correct_answer": 1.0,
        "lenient": {"fn": "format_reward", "weight": 0.2, "strict": False},
        "overlong_penalty": {"weight": 0.5, "max_length": 10, "cache_length": 4},
        "exact": {"fn": "examples.reverse_words_env:exact_match", "weight": 0.0},
        "tokens": {"fn": "length_metric", "weight": 0.0},
    }
    return c


def test_single_turn_env_reads_jsonl_through_the_field_mapping_and_scores_with_the_configured_rubric(tmp_path):
    c = _single_turn_config(tmp_path)
    config_utils.validate(c)
    env = components.build_env(c.env)
    assert isinstance(env, SingleTurnEnv)
    rows = env.dataset("train")
    assert [r["question"] for r in rows[:2]] == ["0 + 1?", "1 + 1?"] and rows[0]["answer"] == "1"
    assert rows[0]["info"] == {"index": 0, "src": "mine"} and rows[0]["task"] == "single_turn"
    assert env.dataset("test")[0]["answer"] == "14"
    drawn = env.dataset("train", n=4, seed=1)
    assert len(drawn) == 4 and drawn == env.dataset("train", n=4, seed=1) and drawn != rows[:4]
    weights = {f.name: f.weight for f in env.rubric.funcs + env.rubric.token_funcs}
    assert weights == {"correct_answer": 1.0, "lenient": 0.2, "overlong_penalty": 0.5, "exact": 0.0, "tokens": 0.0}

    prompt, state = env.initial_state(rows[2])
    assert prompt[0] == {"role": "system", "content": "Answer in <answer></answer>."}
    gold, wrong = env.gold_completion(rows[2]), [{"role": "assistant", "content": "<answer>9</answer>"}]
    states = [dict(state, completion_tokens=3), dict(state, completion_tokens=8)]
    scores = env.score([prompt, prompt], [gold, wrong], states)
    # gold: 1 + 0.2 and no penalty; wrong: 0 + 0.2 - 0.5 * (8 - 6) / 4
    assert scores.rewards.tolist() == pytest.approx([1.2, -0.05])
    assert scores.scores["exact"].tolist() == [1.0, 0.0]


def test_a_dataset_replaces_the_rows_of_a_registered_env(tmp_path):
    c = config_utils.default_config()
    c.env.name, c.env.kwargs.difficulty = "arithmetic", "easy"
    c.env.dataset.type = "jsonl"
    c.env.dataset.train = _write_jsonl(tmp_path / "t.jsonl", [{"question": "2 + 2", "answer": "4"}])
    config_utils.validate(c)
    env = components.build_env(c.env)
    assert env.dataset("train") == [{"question": "2 + 2", "answer": "4", "info": {"index": 0},
                                     "task": "arithmetic"}]
    with pytest.raises(ValueError, match="no 'test' file"):
        env.dataset("test")


def test_hf_datasets_are_imported_on_use_with_a_clear_error(monkeypatch):
    spec = {"type": "hf", "path": "openai/gsm8k", "name": "main", "split": "train"}
    fn = datasets.dataset_from_config(spec)  # nothing imported yet
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        fn("train")
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda path, name, data_dir=None, split=None: calls.append((path, name, split)) or [
        {"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert [r["question"] for r in fn("test")] == ["q0", "q1"] and calls == [("openai/gsm8k", "main", "train")]


def test_tfds_is_read_through_data_source_without_downloading(monkeypatch):
    calls = []
    fake = types.ModuleType("tensorflow_datasets")
    fake.data_source = lambda name, split, data_dir, download: calls.append((name, split, data_dir, download)) or [
        {"problem": b"1 + 1", "solution": b"2"}]
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    rows = datasets.load_rows({"type": "tfds", "name": "toy", "data_dir": "/d", "question": "problem",
                               "answer": "solution"}, "test")
    assert rows == [{"question": "1 + 1", "answer": "2", "info": {"index": 0}}]
    assert calls == [("toy", "test", "/d", False)]


def test_a_group_from_config_mixes_its_tasks_by_weight():
    c = config_utils.default_config()
    c.env.name = "group"
    c.env.envs = {"arith": {"name": "arithmetic", "kwargs": {"difficulty": "easy"}, "weight": 3.0},
                  "reverse": {"name": "examples.reverse_words_env:load_environment", "weight": 1.0}}
    config_utils.validate(c)
    env = components.build_env(c.env)
    assert isinstance(env, EnvGroup) and env.proportions == {"arith": 0.75, "reverse": 0.25}
    tasks = [row["task"] for row in env.dataset("train", n=8)]
    assert tasks.count("arith") == 6 and tasks.count("reverse") == 2
    assert env.envs["reverse"].name == "reverse"
    assert sorted(env.rubric.names) == ["arith/correct_answer", "arith/strict_format", "reverse/exact_match",
                                        "reverse/strict_format"]


def test_a_group_task_can_be_a_single_turn_env_over_its_own_jsonl(tmp_path):
    c = config_utils.default_config()
    c.env.name = "group"
    train = _write_jsonl(tmp_path / "t.jsonl", [{"question": "hi", "answer": "1"}])
    c.env.envs = {"mine": {"name": "single_turn", "kwargs": {"dataset": {"type": "jsonl", "train": train}}},
                  "arith": {"name": "arithmetic", "kwargs": {"difficulty": "easy"}}}
    config_utils.validate(c)
    rows = components.build_env(c.env).dataset("train", n=4)
    assert [r["question"] for r in rows if r["task"] == "mine"] == ["hi"]  # 2 asked, 1 there


@pytest.mark.parametrize("change,match", [
    (lambda c: setattr(c.env, "name", "group"), r"config.env.envs: env.name = 'group' needs"),
    (lambda c: (setattr(c.env, "name", "group"), setattr(c.env, "envs", {"a": {"name": "chess"}})),
     r"config.env.envs.a.name: 'chess' is not a registered env"),
    (lambda c: (setattr(c.env, "name", "group"), setattr(c.env, "envs", {"a": {"name": "arithmetic", "weight": 0}})),
     r"config.env.envs.a.weight: a mixture weight must be a positive number"),
    (lambda c: setattr(c.env, "envs", {"a": {"name": "arithmetic"}}), r"config.env.envs: only used with"),
    (lambda c: (setattr(c.env, "name", "group"), setattr(c.env, "envs", {"a": {"name": "arithmetic"}}),
                setattr(c.env.rubric, "funcs", {"correct_answer": 1.0})), r"config.env.rubric.funcs: a group"),
    (lambda c: (setattr(c.env, "name", "group"), setattr(c.env, "envs", {"a": {"name": "arithmetic"}}),
                setattr(c.env.dataset, "type", "jsonl")), r"config.env.dataset.type: a group's rows"),
    (lambda c: setattr(c.env.dataset, "type", "csv"), r"config.env.dataset.type: 'csv' is not one of"),
    (lambda c: setattr(c.env.dataset, "type", "jsonl"), r"config.env.dataset.train: a jsonl dataset needs it"),
    (lambda c: (setattr(c.env.dataset, "type", "jsonl"), setattr(c.env.dataset, "path", "x")),
     r"config.env.dataset: \['path'\]: not keys of a jsonl dataset"),
    (lambda c: setattr(c.env, "name", "single_turn"), r"config.env.dataset.type: a single_turn env reads"),
    (lambda c: setattr(c.env.rubric, "funcs", {"nope": 1.0}), r"config.env.rubric.funcs.nope: reward 'nope'"),
    (lambda c: setattr(c.env.rubric, "funcs", {"x": {"fn": "examples.reverse_words_env:missing"}}),
     r"config.env.rubric.funcs.x: .*no function 'missing'"),
    (lambda c: setattr(c.env.rubric, "funcs", {"correct_answer": "high"}),
     r"config.env.rubric.funcs.correct_answer: a weight"),
])
def test_env_config_errors_name_the_field(change, match):
    c = config_utils.default_config()
    change(c)
    with pytest.raises(config_utils.ConfigError, match=match):
        config_utils.validate(c)


def test_rubric_from_config_resolves_builtin_plugin_and_token_rewards():
    parser = answer_parser()
    rubric = registry.rubric_from_config(
        {"correct_answer": 1.0, "overlong_reward": {"weight": -1.0, "max_length": 8, "cache_length": 2}},
        parser)
    assert rubric.names == ["correct_answer", "overlong_reward"]
    assert rubric.token_funcs[0].weight == -1.0 and rubric.parser is parser
    assert registry.parser_from_config({"fields": ["think", "answer"]}).fields == ("think", "answer")
    with pytest.raises(ValueError, match="'xml'"):
        registry.parser_from_config("xml")


def test_the_example_plug_in_trains_two_steps_through_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    result = subprocess.run(
        [sys.executable, "experiments/train.py", "--config", "examples/reverse_words_tiny.py:runlocal",
         "--config.env.name=examples.reverse_words_env:load_environment", "--workdir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/exact_match" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("reward" in r and "reward/strict_format" in r for r in steps)
