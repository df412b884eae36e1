"""GSM8K through the TFDS builder (array_record, no TensorFlow) from small local JSONL files."""

import json
import sys

import numpy as np
import pytest

TRAIN = [
    ("Tom has 3 apples and buys 5 more. How many apples does he have?",
     "Tom has 3+5=<<3+5=8>>8 apples.\n#### 8"),
    ("A book costs $12. How much do 100 books cost?",
     "100 books cost 100*12=<<100*12=1200>>1200 dollars.\n#### 1,200"),
    ("Ann reads 15 pages a day for 4 days, then 10 more pages. How many pages did she read?",
     "In 4 days she reads 15*4=<<15*4=60>>60 pages.\nIn total 60+10=<<60+10=70>>70 pages.\n#### 70"),
    ("A pizza is cut into 8 slices. 3 friends eat 2 slices each. How many are left?",
     "They eat 3*2=<<3*2=6>>6 slices.\n8-6=<<8-6=2>>2 are left.\n#### 2"),
]
TEST = [("Sam runs 4 km a day. How far does he run in 7 days?", "4*7=<<4*7=28>>28 km.\n#### 28")]


@pytest.fixture(scope="module")
def gsm8k_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm8k")
    manual = root / "manual"
    manual.mkdir()
    for name, rows in (("train", TRAIN), ("test", TEST)):
        with open(manual / f"{name}.jsonl", "w") as f:
            for question, answer in rows:
                f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return str(root / "data"), str(manual)


def test_builds_through_tfds_into_array_record_without_tensorflow(gsm8k_dirs):
    import tensorflow_datasets as tfds

    from grpo_jax.envs.gsm8k import GSM8KEnv, prepare_gsm8k
    data_dir, manual_dir = gsm8k_dirs
    builder = prepare_gsm8k(data_dir, manual_dir)
    assert builder.info.splits["train"].num_examples == 4 and builder.info.splits["test"].num_examples == 1
    files = sorted(p.name for p in builder.data_path.iterdir())
    assert any(".array_record" in f for f in files), files
    source = tfds.data_source("gsm8k", split="train", data_dir=data_dir)
    assert len(source) == 4
    stored = {int(source[i]["index"]): source[i]["question"].decode() for i in range(4)}
    assert stored == {i: question for i, (question, _) in enumerate(TRAIN)}
    env = GSM8KEnv(data_dir, manual_dir=manual_dir)
    rows = env.dataset("train")
    assert [r["answer"] for r in rows] == ["8", "1200", "70", "2"]
    assert rows[2]["question"] == TRAIN[2][0] and rows[2]["task"] == "gsm8k"
    assert env.dataset("test") == [{"question": TEST[0][0], "answer": "28", "task": "gsm8k",
                                    "info": {"solution": TEST[0][1], "index": 0}}]
    subset = env.dataset("train", n=2, seed=1)
    assert len(subset) == 2 and subset == env.dataset("train", n=2, seed=1)
    assert "tensorflow" not in sys.modules


def test_answers_checked_by_the_numeric_matcher(gsm8k_dirs):
    from grpo_jax.envs import replay_episodes
    from grpo_jax.envs.gsm8k import GSM8KEnv
    data_dir, manual_dir = gsm8k_dirs
    env = GSM8KEnv(data_dir, manual_dir=manual_dir)
    rows = env.dataset("train")
    gold = [env.gold_completion(r) for r in rows]
    assert gold[1][0]["content"] == ("<think>100 books cost 100*12=1200 dollars.</think>\n"
                                     "<answer>1200</answer>")
    replies = ["<think>...</think>\n<answer>8</answer>",            # right
               "<think>...</think>\n<answer>$1,200.00</answer>",    # right, formatted differently
               "<answer>70 pages</answer>",                         # right, with a unit, no thinking
               "<think>It is 2.</think>\n<answer>3</answer>"]       # wrong
    scripted = [[{"role": "assistant", "content": text}] for text in replies]
    scores = env.score_episodes(replay_episodes(env, rows, scripted))
    np.testing.assert_allclose(scores.scores["correct_answer"], [1, 1, 1, 0])
    np.testing.assert_allclose(scores.rewards, [1.2, 1.2, 1.2, 0.2])
    np.testing.assert_allclose(env.score_episodes(replay_episodes(env, rows, gold)).rewards, 1.2)
    report = env.audit(rows)
    assert report.passed and report.gold_score == pytest.approx(1.2)


def test_download_path_uses_the_official_urls(tmp_path, gsm8k_dirs, monkeypatch):
    """Without manual files the builder asks the download manager for the official URLs."""
    import tensorflow_datasets as tfds

    from grpo_jax.envs.gsm8k import GSM8K_URLS, load_gsm8k_rows
    _, manual_dir = gsm8k_dirs
    asked = []

    def fake_download(self, urls):  # serve the local files instead of the network
        asked.append(dict(urls))
        return {split: f"{manual_dir}/{split}.jsonl" for split in urls}

    monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
    rows = load_gsm8k_rows("test", str(tmp_path / "data"))
    assert asked == [GSM8K_URLS] and [r["answer"] for r in rows] == ["28"]
