"""Multi-process training: 2 processes x 2 CPU devices (jax.distributed, gloo over loopback) write
the metrics that 1 process x 4 devices writes, and their checkpoint restores.

Both runs use the same global mesh (data=2 across the processes, fsdp=2 within each) and the
same XLA flags, so each process samples on a local mesh laid out like its share of the global
one. What is exact and what is not:

* host metrics (rewards, rollout and tool statistics, evaluation, sample conversations) are
  reduced from the gathered per-episode values with the single-process code: bitwise equal;
* train-step metrics (loss, entropy, ratios, grad norm ...) sum over the batch rows with a
  cross-process all-reduce (gloo) instead of the in-process one: equal up to float rounding
  (rtol 1e-5 here; in practice a few ulps), and the weights they update equally close.

The pieces are also tested in one process: a block of rows rolled out with its episode ids gives
the whole batch's episodes, and merging the blocks' summaries gives the whole batch's metrics.
"""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from tokenizer_fixtures import sp_tokenizer, sp_tokenizer_dir  # noqa: F401  (fixtures used by name)

from grpo_jax import collector, components, distributed, trainer
from grpo_jax import rollout as rl
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.envs import EnvGroup
from grpo_jax.envs.arithmetic import ArithmeticEnv
from grpo_jax.envs.calculator import CalculatorEnv
from grpo_jax.metrics import read_metrics
from grpo_jax.sampling import STOP_TOKEN, Samples
from jax.sharding import Mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "calculator_tiny"
# The small variant, with enough warm start for rewards that differ within groups (a learning
# signal: non-zero advantages, gradients, updates) and a few multi-turn tool episodes.
OVERRIDES = {
    "mesh.data": 2, "mesh.fsdp": 2,
    "sft.steps": 30, "sft.num_demos": 64, "sft.learning_rate": 2e-2, "sft.warmup_steps": 5,
    "rollout.group_size": 4,
    "rollout.length_multiple": 128,   # one trajectory width: the train step compiles once
    "checkpoint.every": 3,
}
# Shorter compiles (LLVM's optimisations are most of a compile on CPU); the same for both runs.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT_S = 600
RTOL, ATOL = 1e-5, 1e-6


def _config():
    spec = importlib.util.spec_from_file_location(CONFIG, os.path.join(ROOT, "configs", f"{CONFIG}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    with config.unlocked():
        for key, value in OVERRIDES.items():
            group, name = key.split(".")
            config[group][name] = value
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script, workdir, devices, *, process_id=None, num_processes=None, port=None):
    loopback = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get("NO_PROXY")]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", NO_PROXY=loopback, no_proxy=loopback,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
    args = [sys.executable, os.path.join(ROOT, "experiments", script),
            f"--config={os.path.join(ROOT, 'configs', CONFIG + '.py')}:runlocal", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
    if num_processes is not None:
        args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                 f"--process_id={process_id}"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs):
    outputs = []
    for name, proc in procs:
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for _, other in procs:
                other.kill()
            raise
        outputs.append(out)
        assert proc.returncode == 0, f"{name} failed:\n{out[-6000:]}"
    return outputs


def _two_processes(script, workdir):
    port = _free_port()
    return [(f"{script} process {i}", _launch(script, workdir, 2, process_id=i, num_processes=2, port=port))
            for i in range(2)]


def _comparable(rows):
    """Rows without timings, nor the packed batch's layout (each process packs its own episodes)."""
    return [{k: v for k, v in r.items() if not k.startswith(trainer.TIMING_PREFIXES)
             and k not in trainer.LAYOUT_METRICS} for r in rows]


def _close(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)


def _restored_params(workdir):
    """The newest checkpoint of `workdir`, restored in this process onto all of its devices."""
    config = _config()
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp = 1, -1  # not the mesh the checkpoint was written on
    run = components.build(config, workdir)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        step, state, _, _ = components.restore(run, checkpointer)
    finally:
        checkpointer.close()
    return step, jax.tree.map(np.asarray, jax.device_get(state.params))


def test_two_processes_write_the_metrics_of_one_and_a_checkpoint_that_restores(tmp_path):
    one, two = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
    procs = [("1 process x 4 devices", _launch("train.py", one, 4))] + _two_processes("train.py", two)
    outputs = _finish(procs)
    assert "memory plan" in outputs[1] and "memory plan" not in outputs[2]  # process 0 prints the plan

    # Metrics: written once (by process 0), equal to the single-process run's.
    a, b = _comparable(read_metrics(one)), _comparable(read_metrics(two))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    exact = total = 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x["step"], set(x) ^ set(y))
        for k in x:
            total += 1
            exact += x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k]))
            assert _close(x[k], y[k]), (x["step"], k, x[k], y[k])
    print(f"{exact} of {total} metric values bitwise equal, the rest within rtol {RTOL}")
    train_rows = [r for r in a if "loss" in r]
    assert len(train_rows) == 3
    # The comparison has teeth: rewards differ within groups, so gradients and updates are real.
    assert any(r["grad_norm"] > 0 for r in train_rows), "no learning signal: raise sft.steps in OVERRIDES"
    for x, y in zip(a, b):  # host-side metrics are reduced exactly
        for k in ("reward", "reward_std", "completion_length", "turns/mean", "tool_calls/mean", "num_tokens",
                  "sequence_length/max", "eval/accuracy", "eval/reward"):
            if k in x:
                assert x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])), (x["step"], k)
    with open(os.path.join(one, "samples.txt")) as f, open(os.path.join(two, "samples.txt")) as g:
        assert f.read() == g.read()

    # The checkpoint the 2 processes wrote: restored by 2 processes, it evaluates to what the
    # run measured at that step ...
    (out, _) = _finish(_two_processes("eval.py", two))
    evaluated = _comparable([json.loads(out.strip().splitlines()[-1])])[0]
    final_eval = [r for r in b if "eval/accuracy" in r][-1]
    assert evaluated["step"] == final_eval["step"] == 3
    for k, v in final_eval.items():
        if k.startswith("hack/"):  # the in-training reward-hack monitor's, on the step's rollouts
            continue
        assert v == evaluated[k] or (math.isnan(v) and math.isnan(evaluated[k])), k
    # ... and restored here (1 process, 8 devices) it holds the weights of the 1-process run.
    step_one, params_one = _restored_params(one)
    step_two, params_two = _restored_params(two)
    assert step_one == step_two == 3
    # 1 x 4 and 2 x 2 devices reduce the gradients in different orders, and Adam divides each
    # gradient element by its own scale, so a weight whose gradient is near zero can move by a
    # small fraction of a step differently (seen: 1 weight in 2048 off by 2e-6). A twentieth of
    # the largest move of one step bounds that noise; a wrong update is of the order of a step.
    param_atol = 0.05 * _config().optim.learning_rate
    for p, q in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
        np.testing.assert_allclose(q, p, rtol=RTOL, atol=param_atol)


def test_batch_and_weights_move_between_any_layouts():
    """`global_batch`, `local_copy` and the host collectives in 2 processes, on a mesh ordered by
    process and on one that interleaves the processes' devices (tests/multihost_worker.py)."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    worker = os.path.join(ROOT, "tests", "multihost_worker.py")
    procs = [(f"worker {i}", subprocess.Popen([sys.executable, worker, str(i), "2", str(port)], env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for i in range(2)]
    outputs = _finish(procs)
    assert all(f"process {i}: ok" in out for i, out in enumerate(outputs))


# -- the pieces, in one process ----------------------------------------------------------------
@pytest.mark.parametrize("items,count", [(8, 2), (7, 3), (2, 4), (16, 16)])
def test_process_blocks_partition_the_items_in_order(items, count):
    blocks = [distributed.process_block(items, i, count) for i in range(count)]
    assert blocks[0][0] == 0 and blocks[-1][1] == items
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    sizes = [b - a for a, b in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("shape,local,expected", [
    ((2, 2, 1), 2, (1, 2, 1)),   # data across processes, fsdp within: the test's layout
    ((1, 8, 1), 4, (1, 4, 1)),
    ((2, 4, 2), 8, (1, 4, 2)),   # tp kept whole inside a host
    ((1, 6, 1), 4, None),        # no split: the local copy is replicated
])
def test_local_mesh_sizes_divide_the_global_ones(shape, local, expected):
    mesh = Mesh(np.empty(shape, dtype=object), ("data", "fsdp", "tp"))
    sizes = distributed.local_axis_sizes(mesh, local)
    assert (tuple(sizes.values()) if sizes else None) == expected


class EpisodeIdSampler:
    """A `Sampler` keyed by `row_ids`: episode e calls the calculator in its first e % 3 turns,
    then answers e % 5, so episodes end after different numbers of turns."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.max_new_tokens = 48
        self.stop_token_ids = tuple(tokenizer.stop_ids)
        self.calls = []  # row ids of each call

    def __call__(self, prompts, key, n, row_ids):
        self.calls.append(list(row_ids))
        eot = self.tokenizer.end_of_turn_ids[0]
        tokens = np.zeros((len(row_ids), self.max_new_tokens), np.int32)
        for r, e in enumerate(row_ids):
            turn = self.tokenizer.decode(prompts[r // n]).count("<|im_start|>assistant") - 1
            text = f"<calc>{e}*2</calc>" if turn < e % 3 else f"<answer>{e % 5}</answer>"
            ids = self.tokenizer.encode(text) + [eot]
            tokens[r, :len(ids)] = ids
        lengths = (tokens != 0).sum(1).astype(np.int32)
        return Samples(tokens, -0.01 * (tokens != 0), lengths, np.full(len(row_ids), STOP_TOKEN, np.int32),
                       np.repeat(np.arange(len(prompts)), n))


def _rows():
    rows = []
    for k in range(4):
        if k % 2:
            rows.append({"question": f"What is {k} + 1?", "answer": str(k + 1), "task": "arithmetic"})
        else:
            rows.append({"question": f"What is {k} * 3?", "answer": str(3 * k), "info": {"expression": f"{k} * 3"},
                         "task": "calculator"})
    return rows


def test_a_block_of_rows_rolls_out_as_in_the_whole_batch_and_merges_to_its_metrics(sp_tokenizer):
    """What each process does with its block (rollout with the block's episode ids, scoring) and
    what the merge of the blocks gives: the episodes and metrics of the whole batch, exactly."""
    env = EnvGroup([ArithmeticEnv(), CalculatorEnv(max_turns=3)])
    config = rl.RolloutConfig(group_size=3, max_new_tokens=48, max_seq_len=512)
    rows, key = _rows(), jax.random.key(0)
    whole_sampler = EpisodeIdSampler(sp_tokenizer)
    whole = rl.rollout(env, rows, sp_tokenizer, whole_sampler, key, config)
    assert whole.num_turns.max() == 3 and len(whole_sampler.calls) == 3  # several turns, unequal
    blocks = []
    for start, stop in (distributed.process_block(len(rows), p, 2) for p in range(2)):
        sampler = EpisodeIdSampler(sp_tokenizer)
        part = rl.rollout(env, rows[start:stop], sp_tokenizer, sampler, key, config,
                          episode_offset=start * config.group_size)
        episodes = slice(start * config.group_size, stop * config.group_size)
        for i, j in enumerate(range(len(whole))[episodes]):
            n = whole.lengths[j]
            assert part.lengths[i] == n and part.tokens[i, :n].tolist() == whole.tokens[j, :n].tolist()
            assert part.completions[i] == whole.completions[j]
        assert part.finish_reasons == whole.finish_reasons[episodes]
        for ids, all_ids in zip(sampler.calls, whole_sampler.calls):  # the global ids, turn by turn
            assert set(ids) <= set(all_ids)
        blocks.append((part, part.score(env)))

    scores = whole.score(env)
    expected = collector.gather_episodes(whole, scores, 3)
    merged = collector.merge_episodes([collector.episode_summary(p, s, 3) for p, s in blocks])
    assert "reward/arithmetic" in merged.score_metrics and "failures/calculator/correct_answer" in merged.score_metrics
    np.testing.assert_array_equal(merged.rewards, expected.rewards)
    assert np.isfinite(expected.rewards).all() and np.std(expected.rewards) > 0
    assert merged.score_metrics == expected.score_metrics
    timeless = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    assert timeless(merged.rollout_metrics) == timeless(expected.rollout_metrics)
    assert merged.width == expected.width
    np.testing.assert_array_equal(merged.turn_rewards, expected.turn_rewards)
    np.testing.assert_array_equal(merged.num_turns, expected.num_turns)
    assert merged.scores.keys() == expected.scores.keys()
    for name in expected.scores:
        np.testing.assert_array_equal(merged.scores[name], expected.scores[name])
