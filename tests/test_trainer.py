"""End-to-end: the trainer on the small variants of the configs, resume, signals, bad configs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_fixtures import load_config

from grpo_jax import collector, components, config_utils, trainer
from grpo_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def _training_rows(workdir):
    """Rows without wall-clock values: what must be identical between equivalent runs."""
    out = []
    for row in read_metrics(workdir):
        out.append({k: v for k, v in row.items() if not k.startswith(trainer.TIMING_PREFIXES)})
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert (x[k] == y[k]) or (math.isnan(x[k]) and math.isnan(y[k])), (x["step"], k, x[k], y[k])


@pytest.mark.parametrize("name", ["calculator_tiny", "arithmetic_tiny", "countdown_tiny"])
def test_config_small_variant_runs_end_to_end(name, tmp_path):
    config = load_config(name)
    summary = trainer.run(config, str(tmp_path))
    rows = read_metrics(str(tmp_path))
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, config.train.num_steps + 1))
    for key in ("reward", "kl", "entropy", "completion_length", "frac_reward_zero_std", "step_time",
                "clip_ratio/region", "grad_norm", "train/padding_frac", "train/padding_frac_unpacked",
                "train/rows"):
        if key == "kl" and config.grpo.beta == 0:
            continue
        assert key in train_rows[-1], key
    assert any(k.startswith("reward/") for k in train_rows[-1])
    # Packed by default (grpo.pack): rows of rollout.max_seq_len, no more padding than one per row.
    assert config.grpo.pack and 0 <= train_rows[-1]["train/padding_frac"] < 1
    assert train_rows[-1]["train/rows"] <= config.train.prompts_per_step * config.rollout.group_size
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    assert eval_rows[0]["step"] == 0 and eval_rows[-1]["step"] == config.train.num_steps
    assert summary["eval_after"]["eval/num_problems"] == config.eval.num_examples
    assert os.path.exists(tmp_path / "samples.txt")
    assert os.path.isdir(tmp_path / "tensorboard")
    assert str(config.train.num_steps) in os.listdir(tmp_path / "checkpoints")


def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    config = load_config("calculator_tiny")
    with config.unlocked():
        config.train.num_steps = 4
        config.train.eval_every = 3
        config.checkpoint.every = 1
        config.grpo.beta = 0.04  # the reference weights must survive the restart too
    whole = str(tmp_path / "whole")
    trainer.run(config, whole)

    split = str(tmp_path / "split")
    first = trainer.run(config, split, stop_after=2)
    assert first["last_step"] == 2 and first["stopped_early"]
    # A row written after the checkpoint (a crash before the next one) is dropped on resume.
    with open(os.path.join(split, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "reward": 123.0}) + "\n")
    trainer.run(config, split)
    _same(_training_rows(whole), _training_rows(split))


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    overrides = ["--config.train.num_steps=200", "--config.checkpoint.every=1000"]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
         f"--config={os.path.join(ROOT, 'configs', 'calculator_tiny.py')}:runlocal", f"--workdir={workdir}",
         *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.exists(metrics) and any('"loss"' in line for line in open(metrics)):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "stopped by signal 15" in out
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    stopped_at = steps[-1]
    assert 0 < stopped_at < 200
    config = load_config("calculator_tiny")
    with config.unlocked():
        config.train.num_steps = stopped_at + 1
    summary = trainer.run(config, workdir)
    assert summary["last_step"] == stopped_at + 1
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == list(range(1, stopped_at + 2))


def test_mistyped_override_fails_before_compiling():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
         f"--config={os.path.join(ROOT, 'configs', 'calculator_tiny.py')}:runlocal", "--workdir=/nonexistent/x",
         "--config.grpo.bta=0.1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "bta" in proc.stderr + proc.stdout


@pytest.mark.parametrize("field,value,match", [
    ("rollout.group_size", 1, "rollout.group_size"),
    ("grpo.loss_type", "ppo", "grpo.loss_type"),
    ("rollout.max_seq_len", 4096, "rollout.max_seq_len"),
    ("grpo.micro_batch_size", 3, "grpo.micro_batch_size"),
    ("grpo.micro_batch_tokens", 100, "grpo.micro_batch_tokens"),  # 1 row: not a multiple of the devices
    ("grpo.pack", False, None),  # with micro_batch_tokens set below: packed rows only
    ("grpo.loss_type", "cispo", "grpo.epsilon_high"),
    ("env.name", "chess", "env.name"),
    ("grpo.advantage_baseline", "median", "grpo.advantage_baseline"),
    ("grpo.kl_estimator", "k4", "grpo.kl_estimator"),
])
def test_inconsistent_config_fails_with_the_field_named(field, value, match, tmp_path):
    config = load_config("calculator_tiny")
    group, name = field.split(".")
    with config.unlocked():
        config[group][name] = value
        if field == "grpo.pack":
            config.grpo.micro_batch_tokens, match = 1024, "grpo.micro_batch_tokens"
    with pytest.raises(config_utils.ConfigError, match=match):
        trainer.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing built or written


def test_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
    build = components.build_model

    def poisoned(config, tokenizer, mesh=None):
        model = build(config, tokenizer, mesh)
        model.final_norm[...] = jnp.full_like(model.final_norm[...], jnp.nan)
        return model

    monkeypatch.setattr(components, "build_model", poisoned)
    config = load_config("calculator_tiny")
    with config.unlocked():
        config.sft.steps = 0
    with pytest.raises(FloatingPointError, match="step 1"):
        trainer.run(config, str(tmp_path))


def test_step_rows_are_a_permutation_per_epoch():
    rows = np.concatenate([collector.step_rows(10, s, 5, seed=0) for s in range(1, 5)])
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    np.testing.assert_array_equal(collector.step_rows(10, 3, 5, 0), rows[10:15])


def test_gsm8k_qwen_config_small_variant(tmp_path):
    """The GSM8K config on a tiny random Qwen2 checkpoint and GSM8K files prepared through TFDS."""
    from tokenizer_fixtures import build_hf_tokenizer_dir

    from grpo_jax.models import ModelConfig, create_model, save_hf

    model_dir = tmp_path / "qwen"
    build_hf_tokenizer_dir(model_dir)
    save_hf(create_model(ModelConfig(model_type="qwen2", vocab_size=512, d_model=32, n_layers=1, n_heads=4,
                                     n_kv_heads=2, head_dim=8, d_ff=64, qkv_bias=True, tie_embeddings=True,
                                     max_position_embeddings=512)), str(model_dir))
    manual = tmp_path / "manual"
    manual.mkdir()
    problems = [("Tom has 3 apples and buys 5 more. How many apples does he have?", "3+5=<<3+5=8>>8\n#### 8"),
                ("A book costs $12. How much do 10 books cost?", "10*12=<<10*12=120>>120\n#### 120")]
    for split in ("train", "test"):
        with open(manual / f"{split}.jsonl", "w") as f:
            for question, answer in problems:
                f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    config = load_config("gsm8k_qwen2_5_0_5b", f"model_dir={model_dir},data_dir={tmp_path / 'tfds'},"
                                                 f"manual_dir={manual},runlocal")
    summary = trainer.run(config, str(tmp_path / "run"))
    assert "tensorflow" not in sys.modules
    assert summary["last_step"] == 2
    rows = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["kl"]) for r in rows if "loss" in r)  # beta > 0: the reference is used
