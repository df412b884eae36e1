"""The workdir survives a hostile user: kills mid-write, a corrupt checkpoint, a second run, a
changed config. End-to-end cases run the tiny calculator config for two steps."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest

from grpo_jax import config_utils, trainer
from grpo_jax import workdir as workdir_lib
from grpo_jax.metrics import MetricsWriter, read_metrics
from test_trainer import ROOT, _same, _training_rows, load_config


def _config(**train):
    config = load_config("calculator_tiny")
    with config.unlocked():
        config.sft.mixed_steps = 2  # warm-start rows, fewer of them
        config.train.num_steps = 2
        config.checkpoint.every = 1
        config.train.update(train)
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The workdir of an uninterrupted run of `_config()`."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    trainer.run(_config(), workdir)
    return workdir


# ---------------------------------------------------------------------------------------------
# metrics.jsonl and samples.txt
# ---------------------------------------------------------------------------------------------
def _write_rows(path, steps, tail=""):
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s, "reward": float(s)}) + "\n" for s in steps)
        f.write(tail)


def test_torn_last_line_is_skipped_and_trimmed_naming_file_and_line(tmp_path, caplog):
    path = str(tmp_path / "metrics.jsonl")
    _write_rows(path, [0, 1, 2], tail='{"step": 3, "rew')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2]
    assert f"{path}:4" in caplog.text
    assert workdir_lib.trim_metrics(path, 1) == 1
    assert open(path).read() == "".join(json.dumps({"step": s, "reward": float(s)}) + "\n" for s in (0, 1))
    assert workdir_lib.trim_metrics(path, None) == 2 and open(path).read() == ""


def test_malformed_middle_line_names_file_and_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    _write_rows(path, [0, 1], tail='{"step": 2, "rew\n' + json.dumps({"step": 3}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3"):
        read_metrics(str(tmp_path))
    with pytest.raises(ValueError, match=f"{path}:3"):  # a resume refuses to guess, too
        workdir_lib.trim_metrics(path, 5)


def test_writer_appends_whole_lines(tmp_path):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    for step in range(3):
        writer.write(step, {"reward": 0.5, "loss": float("nan")})
    text = open(tmp_path / "metrics.jsonl").read()
    assert text.endswith("\n") and len(text.splitlines()) == 3
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2]


def test_samples_are_rewound_by_step():
    text = "=== step 0\na\n=== step 2\nb\n=== step 4\nc\n"
    assert workdir_lib.trim_samples(text, 3) == "=== step 0\na\n=== step 2\nb\n"
    assert workdir_lib.trim_samples(text, 4) == text
    assert workdir_lib.trim_samples(text, None) == ""


def test_fresh_start_drops_a_killed_runs_rows(uninterrupted, tmp_path):
    """Killed before its first checkpoint: warm-start, step-0 and later rows (and a torn line) of
    the killed run are in metrics.jsonl, no checkpoint exists; the rerun writes each row once."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    for name in ("metrics.jsonl", "samples.txt"):
        shutil.copy(os.path.join(uninterrupted, name), workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "sft/lo')
    trainer.run(_config(), workdir)
    _same(_training_rows(uninterrupted), _training_rows(workdir))
    assert open(os.path.join(workdir, "samples.txt")).read().count("=== step 0\n") == 1


# ---------------------------------------------------------------------------------------------
# A corrupt checkpoint
# ---------------------------------------------------------------------------------------------
def _corrupt(step_dir):
    """Truncates every file of the checkpoint's array tree (a disk that lost the write)."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            open(os.path.join(root, name), "w").close()


def test_corrupt_checkpoint_is_moved_aside_and_the_run_resumes(uninterrupted, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    trainer.run(_config(), workdir, stop_after=1)
    checkpoints = os.path.join(workdir, "checkpoints")
    _corrupt(os.path.join(checkpoints, "1"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2, "rew')  # killed mid-write, too
    with caplog.at_level(logging.WARNING):
        summary = trainer.run(_config(), workdir)  # resumes from step 0 and saves step 1 again
    assert summary["last_step"] == 2
    assert "corrupt-1" in caplog.text and "metrics.jsonl:" in caplog.text
    assert {"0", "1", "2", "corrupt-1"} <= set(os.listdir(checkpoints))
    _same(_training_rows(uninterrupted), _training_rows(workdir))


# ---------------------------------------------------------------------------------------------
# One run per workdir
# ---------------------------------------------------------------------------------------------
def _hold_lock(workdir):
    """A process that holds `workdir`'s lock until killed."""
    code = ("import sys; from grpo_jax import workdir; held = workdir.lock(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, workdir], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_a_locked_workdir_fails_naming_the_holder(tmp_path):
    workdir = str(tmp_path)
    holder = _hold_lock(workdir)
    try:
        with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {holder.pid} on host"):
            trainer.run(_config(), workdir)
        assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    finally:
        holder.send_signal(signal.SIGKILL)  # a holder that dies without cleaning up
        holder.wait()
    workdir_lib.lock(workdir).release()  # its lock is gone with it


def test_lock_is_released_when_the_run_fails(tmp_path, monkeypatch):
    def broken(config, workdir):
        raise RuntimeError("broken build")

    monkeypatch.setattr(trainer, "build", broken)
    with pytest.raises(RuntimeError, match="broken build"):
        trainer.run(_config(), str(tmp_path))
    with workdir_lib.lock(str(tmp_path)):
        assert json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
    assert open(tmp_path / ".lock").read() == ""  # released: names nobody


# ---------------------------------------------------------------------------------------------
# The workdir's config
# ---------------------------------------------------------------------------------------------
def test_config_changes_name_the_fields_that_matter():
    old = {"model": {"d_model": 32}, "tokenizer": {"train_vocab_size": 320}, "train": {"num_steps": 2},
           "checkpoint": {"every": 1}, "env": {"kwargs": {"difficulty": "3x3"}}}
    new = {"model": {"d_model": 64}, "tokenizer": {"train_vocab_size": 320}, "train": {"num_steps": 9},
           "checkpoint": {"every": 5}, "env": {"kwargs": {"difficulty": "4x4"}}, "added": 1}
    assert workdir_lib.config_changes(old, new) == ["env.kwargs.difficulty: '3x3' -> '4x4'",
                                                    "model.d_model: 32 -> 64"]


def test_changed_config_is_refused_unless_allowed(uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(uninterrupted, workdir)
    before = sorted(os.listdir(workdir)), open(os.path.join(workdir, "config.json")).read()
    changed = _config()
    with changed.unlocked():
        changed.model.d_model = 64
        changed.tokenizer.train_vocab_size = 300
    with pytest.raises(config_utils.ConfigError, match="model.d_model: 32 -> 64.*tokenizer.train_vocab_size"):
        trainer.run(changed, workdir)
    assert (sorted(os.listdir(workdir)), open(os.path.join(workdir, "config.json")).read()) == before

    # A longer run is no change; a changed objective is, unless allowed.
    extended = _config(num_steps=3)
    with extended.unlocked():
        extended.grpo.epsilon = 0.3
    with pytest.raises(config_utils.ConfigError, match=r"in 1 field\(s\).*: grpo.epsilon: 0.2 -> 0.3\."):
        trainer.run(extended, workdir)
    with extended.unlocked():
        extended.allow_config_change = True
    assert trainer.run(extended, workdir)["last_step"] == 3
    assert json.load(open(os.path.join(workdir, "config.json")))["grpo"]["epsilon"] == 0.3
