"""`run(config, workdir)`: the GRPO experiment loop.

    run = build(config, workdir)         env, tokenizer, model, mesh, settings, train step
                                                                            (grpo_jax.components)
    resume from workdir/checkpoints, or warm start (grpo_jax.sft) and evaluate step 0
    for step in 1..num_steps:
        batch, row = collector.collect(state, step):                        (`Collector`)
            rows     = the step's prompts (a fixed permutation per epoch: a function of the step)
            rollout  = episodes of the current policy, group_size per prompt (grpo_jax.rollout)
            rewards  = rubric scores (NaN where a reward function failed), gathered over processes
            adv      = group_advantages(rewards)                             (grpo_jax.advantages)
            stored   = the episodes, scores, advantages: workdir/rollouts/ (grpo_jax.rollout_store)
            batch    = the episodes packed into rows of rollout.max_seq_len   (grpo_jax.packing)
                       (grpo.pack = False: one episode per row)
        state    = run.train_step(state, batch)                             (grpo_jax.train_step)
        metrics of the previous step are fetched here (one step late: no host sync in the step)
        evaluate every eval_every steps; checkpoint every checkpoint.every steps

Randomness: step s uses fold_in(key(seed), s); rows and keys are functions of the step, so a run
resumed from a checkpoint writes the same metrics as an uninterrupted one (bitwise on CPU; only
wall-clock timings differ).

The workdir (`grpo_jax.workdir`): a run locks it (`.lock`; a second run fails naming the holder),
refuses a config that differs from its `config.json` in what the checkpoints were built from
(unless `config.allow_config_change`), and rewinds what a killed run logged past the step it
starts from: rows of metrics.jsonl and samples.txt sections (all of them on a fresh start), a
torn last line, TensorBoard events. A newest checkpoint that does not restore is moved aside to
`checkpoints/corrupt-<step>` and the run resumes from the one before.

Several processes (`jax.distributed`, see `grpo_jax.distributed`): process p rolls out its
contiguous block of the step's prompts on its own devices (with the episodes' global ids, so
the samples are those of a one-process run), the per-episode rewards and statistics are gathered
so every process computes the metrics of the whole batch, advantages come from the gathered
rewards, and each process's rows become its block of the global batch of the compiled step
(packed: every process packs its own episodes, padded with empty rows to the most rows any
process needs).
Only process 0 writes metrics.jsonl, TensorBoard and samples.txt; all processes checkpoint and
restore together. A signal received by any process stops all of them after the step.

Failure handling: SIGTERM finishes the current step, saves a checkpoint and returns; a
non-finite loss skips its update (`optax.apply_if_finite`) and stops the run with a
`FloatingPointError` naming the step; a reward function that fails gives NaN for that episode,
which is left out of its group's advantages and counted (`reward_nan_fraction`); a step whose
every reward failed stops the run with `RewardError` naming the functions (`grpo_jax.guard`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import config_utils, distributed, guard, packing, rollout_store
from grpo_jax import sharding as sharding_lib
from grpo_jax import workdir as workdir_lib
from grpo_jax.advantages import group_advantages
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.components import Run, build, restore
from grpo_jax.evaluation import evaluate_run
from grpo_jax.memory import plan_for_run
from grpo_jax.metrics import MetricsWriter, read_metrics, to_host
from grpo_jax.models import lora
from grpo_jax.rollout import model_sampler, rollout
from grpo_jax.rubrics.monitor import HackMonitor
from grpo_jax.rubrics.rubric import check_rewards, score_metrics
from grpo_jax.sft import warm_start
from grpo_jax.trajectories import metrics_from_stats

log = logging.getLogger(__name__)

_advantages = jax.jit(group_advantages, static_argnums=(1, 2), static_argnames=("return_info", "baseline"))

# Metrics that measure wall time: the only ones allowed to differ between identical runs.
TIMING_PREFIXES = ("step_time", "time/", "sft/elapsed_s", "eval/time")
# How the train batch was laid out: a multi-process run packs each process's episodes apart, so
# these differ from a one-process run of the same episodes (its update does not).
LAYOUT_METRICS = ("train/padding_frac", "train/rows")


def step_rows(num_rows: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """Indices of the training rows of `step` (1-based): a seeded permutation per epoch."""
    start = (step - 1) * per_step
    out = []
    for position in range(start, start + per_step):
        epoch, index = divmod(position, num_rows)
        out.append(np.random.default_rng([seed, epoch]).permutation(num_rows)[index])
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------
# The step's episodes: this process's rollout, gathered over processes.


class Episodes(NamedTuple):
    """What the host needs of a step's whole batch (all processes' episodes, in global order)."""

    rewards: np.ndarray             # [B] float64, NaN where a reward function failed
    rollout_metrics: dict           # `Rollout.metrics` of all episodes (timings: this process's)
    score_metrics: dict             # `RubricScores.metrics` of all episodes
    width: int                      # T of the batch: the widest process's trajectories


def gather_episodes(result, scores) -> Episodes:
    """The step's `Episodes` from this process's rollout and scores.

    One process: its own values. Several: every process's `episode_summary` is gathered and
    merged (`merge_episodes`), so the numbers are those of one process holding every episode
    (timings aside: those are this process's).
    """
    if not distributed.is_multiprocess():
        return Episodes(scores.rewards, dict(result.metrics), dict(scores.metrics), result.tokens.shape[1])
    return merge_episodes(distributed.allgather_objects(episode_summary(result, scores)), jax.process_index())


def episode_summary(result, scores) -> dict[str, Any]:
    """The per-episode numbers of one process's rollout that the step's metrics are made of."""
    m = result.metrics
    return {"rewards": np.asarray(scores.rewards), "scores": dict(scores.scores),
            "failures": dict(scores.failures), "metrics": dict(scores.metrics),
            "tasks": [s.get("task") for s in result.states], "stats": result.episode_stats(),
            "width": result.tokens.shape[1],
            "timing": {"sampler_s": m["time/sampler_s"], "env_s": m["time/env_s"], "total_s": m["time/total_s"],
                       "sampler_calls": m["time/sampler_calls"]}}


def merge_episodes(parts, own: int = 0) -> Episodes:
    """`Episodes` of the concatenated `episode_summary`s of all processes (in process order):
    the single-process formulas applied to the gathered per-episode arrays, so the result
    equals a one-process rollout of the whole batch. Timings are those of `parts[own]`."""
    rewards = np.concatenate([p["rewards"] for p in parts])
    # The sampler loop runs until the last episode ends: as many calls as the longest process.
    timing = {**parts[own]["timing"], "sampler_calls": max(p["timing"]["sampler_calls"] for p in parts)}
    stats = distributed.concat_rows([p["stats"] for p in parts])
    return Episodes(rewards, metrics_from_stats(stats, timing), _score_metrics(parts, rewards),
                    max(p["width"] for p in parts))


def _score_metrics(parts, rewards) -> dict[str, float]:
    """`RubricScores.metrics` of the gathered episodes: `rubrics.score_metrics` on the
    concatenated arrays (per task when the processes' metrics have tasks: an `EnvGroup`); a
    metric it does not make is averaged over processes, weighted by episodes."""
    sizes = [len(p["rewards"]) for p in parts]
    names = list(dict.fromkeys(name for p in parts for name in p["scores"]))
    scores = {name: np.concatenate([p["scores"].get(name, np.full(n, np.nan)) for p, n in zip(parts, sizes)])
              for name in names}
    failures = {name: sum(p["failures"].get(name, 0) for p in parts) for name in names}
    tasks = [t for p in parts for t in p["tasks"]]
    keys = list(dict.fromkeys(k for p in parts for k in p["metrics"]))
    grouped = any(f"reward/{t}" in keys for t in set(tasks) if t is not None)
    out = score_metrics(rewards, scores, failures, tasks if grouped else None)
    for key in (k for k in keys if k not in out):
        log.warning("metric %r has no exact multi-process reduction: averaged over processes", key)
        pairs = [(float(p["metrics"][key]), n) for p, n in zip(parts, sizes) if key in p["metrics"]]
        out[key] = sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1)
    return {k: out[k] for k in keys}  # the processes' keys, in their order


def _rollout_row(episodes: Episodes, adv_info, elapsed_s: float) -> dict[str, float]:
    """The step's host metrics: rollout and rubric metrics, advantage statistics, guard stats."""
    rewards = episodes.rewards
    row = {k: float(v) for k, v in episodes.rollout_metrics.items()}
    row.update({k: float(v) for k, v in episodes.score_metrics.items()})  # "reward", "reward/<f>" ...
    row["reward_std"] = float(np.nanstd(rewards)) if np.isfinite(rewards).any() else float("nan")
    row["completion_length"] = row.get("completion_length/mean", float("nan"))
    row["frac_reward_zero_std"] = float(adv_info["frac_reward_zero_std"])
    row["num_nan_rewards"] = float(adv_info["num_nan_rewards"])
    row["time/rollout_s"] = elapsed_s
    # Reward / tool workers killed or crashed and threads left running, since the process started
    # (workers started is left out: a resumed process starts its own).
    row.update({k: float(v) for k, v in guard.stats().items() if k != "guard/started_workers"})
    return row


class Collector:
    """`collect(state, step) -> (batch, row)`: the step's train batch and host metrics.

    Process p rolls out its contiguous block of the step's prompts (episodes numbered by their
    global ids, so the samples are those of a one-process run); the rewards are gathered, the
    advantages computed on the whole batch, and p's rows become its block of the global batch.
    """

    def __init__(self, run: Run):
        self.run = run
        self.block = distributed.process_block(run.config.train.prompts_per_step)
        self.episode_offset = self.block[0] * run.config.rollout.group_size  # global id of the first
        mesh = run.mesh
        shards = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        # A process's packed rows: with the other processes', they split over the data-parallel
        # devices and into whole micro-batches.
        self.row_multiple = packing.row_multiple(shards, run.train.micro_batch_size, jax.process_count())

    def prompts(self, step: int) -> list:
        """This process's block of the rows of `step` (all of them on one process)."""
        c, rows = self.run.config, self.run.train_rows
        chosen = step_rows(len(rows), step, c.train.prompts_per_step, c.env.data_seed)
        return [rows[i] for i in chosen[self.block[0]:self.block[1]]]

    def collect(self, state, step: int) -> tuple[dict[str, Any], dict[str, float]]:
        run, c = self.run, self.run.config
        started = time.perf_counter()
        sampler = model_sampler(run.sampling_policy(state.params), run.sampling, run.engine)
        result = rollout(run.env, self.prompts(step), run.tokenizer, sampler, jax.random.fold_in(run.root_key, step),
                         run.rollout, episode_offset=self.episode_offset)
        rollout_s = time.perf_counter() - started
        scores = result.score(run.env)
        self.last = (result, scores)  # what the reward-hack monitor reads at an evaluation
        episodes = gather_episodes(result, scores)
        check_rewards(episodes.rewards, episodes.score_metrics, step=step)
        rewards = jnp.asarray(np.asarray(episodes.rewards, np.float32))
        advantages, adv_info = _advantages(rewards, c.rollout.group_size, c.grpo.advantage_scale,
                                           return_info=True, baseline=c.grpo.advantage_baseline)
        rollout_store.store_step(run, step, result, scores, advantages, process_index=jax.process_index(),
                                 episode_offset=self.episode_offset)  # train.store_rollouts: workdir/rollouts/
        batch, stats = self.train_batch(result, advantages, episodes)
        return batch, {**_rollout_row(episodes, jax.device_get(adv_info), rollout_s), **stats}

    def train_batch(self, result, advantages, episodes: Episodes) -> tuple[dict[str, Any], dict[str, float]]:
        """The train step's batch and its padding stats (`packing.padding_stats`, of the whole
        batch): this process's trajectories, packed (grpo.pack) or one per row (padded to the
        widest of any process), with its episodes' slice of `advantages` ([B], the whole
        batch's), as global arrays when there are several processes."""
        c, pad_id, multiprocess = self.run.config, self.run.rollout.pad_id, distributed.is_multiprocess()
        count = len(advantages)
        if c.grpo.pack:
            own = np.asarray(advantages)[self.episode_offset:self.episode_offset + len(result)]
            width = c.rollout.max_seq_len
            batch, _ = packing.pack_rollout(result, own, width=width, row_multiple=self.row_multiple,
                                            pad_id=pad_id)
            rows = len(batch["tokens"])
            if multiprocess:  # every process holds as many rows as the one that needs the most
                rows = max(distributed.allgather_objects(rows))
                batch = packing.pad_rows(batch, rows, pad_id)
            rows *= jax.process_count()
        else:
            width, rows = episodes.width, count
            batch = {"tokens": result.tokens, "positions": result.positions,
                     "segment_ids": result.segment_ids, "loss_mask": result.loss_mask,
                     "old_logps": result.logprobs}
            if not multiprocess:
                batch["advantages"] = advantages
            else:
                batch = {k: np.pad(v, ((0, 0), (0, width - v.shape[1])),
                                   constant_values=pad_id if k == "tokens" else 0) for k, v in batch.items()}
                batch["advantages"] = np.asarray(advantages)[self.episode_offset:self.episode_offset + len(result)]
        real_tokens = round(episodes.rollout_metrics["sequence_length/mean"] * count)
        stats = packing.padding_stats(real_tokens, rows, width, count, episodes.width)
        if not multiprocess:
            return batch, stats
        mesh = self.run.mesh
        return distributed.global_batch(batch, lambda ndim: sharding_lib.batch_sharding(mesh, ndim),
                                        rows), stats


# ---------------------------------------------------------------------------------------------
# Host side of the loop: late metrics, signals, the workdir.


class _LateMetrics:
    """A step's row, held until its device metrics are fetched (one step late: the next rollout
    has already waited for the update, so fetching them then costs no host sync)."""

    def __init__(self, writer: MetricsWriter, checkpointer: Checkpointer, config):
        self.writer, self.checkpointer, self.config = writer, checkpointer, config
        self.pending = None  # (step, device metrics, host row)

    def hold(self, step: int, device_metrics, row: dict[str, float]):
        self.flush()
        self.pending = (step, device_metrics, row)

    def flush(self):
        """Writes the held row; `FloatingPointError` naming the step when its loss is not finite."""
        if self.pending is None:
            return
        (step, device_metrics, row), self.pending = self.pending, None
        row.update(to_host(device_metrics))
        if not (math.isfinite(row.get("loss", 0.0)) and math.isfinite(row.get("grad_norm", 0.0))):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} (loss={row.get('loss')}, grad_norm="
                f"{row.get('grad_norm')}): its update was skipped and training stopped; the last "
                f"checkpoint is step {self.checkpointer.latest_step()} under {self.checkpointer.directory}")
        self.writer.write(step, row)
        if step % self.config.train.log_every == 0 or step == self.config.train.num_steps:
            self.writer.progress(step, row)


class _StopFlag:
    """Set by SIGTERM (main thread only); the loop checks it after every step."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM,):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum
        log.warning("received signal %d: finishing this step, then saving a checkpoint", signum)

    def signalled(self) -> bool:
        """A signal reached this process or, with several, any process (all stop together)."""
        signalled = self.signal is not None
        return distributed.any_process(signalled) if distributed.is_multiprocess() else signalled

    def why(self, signalled: bool) -> str:
        if not signalled:
            return "stop_after"
        return f"signal {self.signal}" if self.signal is not None else "a signal to another process"

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def claim_workdir(config, workdir: str) -> workdir_lib.WorkdirLock | None:
    """Process 0 locks `workdir` and checks and records its config (`grpo_jax.workdir`); its
    refusal is raised on every process, so none is left waiting for the others."""
    held, error = None, None
    if jax.process_index() == 0:
        try:
            held = workdir_lib.lock(workdir)
            workdir_lib.check_config(workdir, config)
        except (workdir_lib.WorkdirBusy, config_utils.ConfigError, OSError) as e:
            error = e
    error = distributed.allgather_objects(error)[0]
    if error is not None:
        if held is not None:
            held.release()
        raise error
    return held


def _print_memory_plan(run: Run):
    if jax.process_index() != 0:
        return
    try:
        print(plan_for_run(run).table(), flush=True)
    except Exception as error:  # noqa: BLE001  (the plan informs; it must not stop a run)
        log.warning("no memory plan for this config: %s: %s", type(error).__name__, error)


def _evaluate(run: Run, writer: MetricsWriter, params, step: int, watch=None) -> dict[str, float]:
    """Evaluates `params`, logs the row and the sample conversations; returns the row. `watch`:
    the reward-hack monitor's check of the step's rollouts (`rubrics.monitor`), its metrics logged too."""
    eval_row, text = evaluate_run(run, params, step)
    eval_row.update(watch(step, eval_row.get("eval/accuracy")) if watch else {})
    writer.write(step, eval_row)
    writer.progress(step, eval_row, prefix="eval at step")
    writer.log_text("samples.txt", f"=== step {step}\n{text}")
    return eval_row


def _save(checkpointer: Checkpointer, step: int, state, ref_params, eval_before, base=None):
    """`base`: the frozen base weights when a warm start changed them under LoRA adapters (a
    resumed run could not rebuild them: `Run.warm_base`)."""
    checkpointer.save(step, {"train": state, "ref": ref_params, "base": base},
                      {"step": step, "eval_before": eval_before}, force=True)


def _begin(run: Run, writer: MetricsWriter, checkpointer: Checkpointer):
    """A fresh start: warm start (config.sft), the initial state and reference, the evaluation
    of step 0 and its checkpoint. Returns (0, state, reference params or None, eval row)."""
    sft = run.config.sft
    if sft.steps > 0 or sft.mixed_steps > 0:
        warm_start(run, writer)
    state = run.init_state()
    ref_params = None
    if run.uses_reference:  # the initial policy; under LoRA the base itself (adapters off, no copy)
        ref_params = (lora.adapters_off(state.params) if lora.has_adapters(run.model)
                      else jax.tree.map(jnp.copy, state.params))
    eval_before = _evaluate(run, writer, state.params, 0)
    _save(checkpointer, 0, state, ref_params, eval_before, run.warm_base())
    return 0, state, ref_params, eval_before


def _resumed(resumed, checkpointer: Checkpointer):
    """(step, state, reference params, eval_before) of a restored checkpoint (`restore`)."""
    start_step, state, ref_params, meta = resumed
    log.info("resumed from the checkpoint of step %d", start_step)
    print(f"resumed from step {start_step} ({checkpointer.directory})", flush=True)
    return start_step, state, ref_params, meta.get("eval_before")


# ---------------------------------------------------------------------------------------------
# The loop.


def run(config, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
    """Trains with GRPO as `config` says, writing metrics and checkpoints under `workdir`.

    `stop_after=s` stops after step s as SIGTERM would (checkpoint saved): a run sliced into
    time-limited jobs, or a test of resumption. Returns a summary: the evaluation before GRPO
    (`eval_before`), after it (`eval_after`), the last step, `stopped_early` and the `state`.
    """
    config_utils.validate(config)  # before anything is built or written
    held = claim_workdir(config, workdir)
    try:
        return _run(config, workdir, stop_after)
    finally:
        if held is not None:
            held.release()


def _run(config, workdir: str, stop_after: int | None) -> dict[str, Any]:
    """`run` in a workdir this process has claimed."""
    c = config
    # --- set-up
    run = build(config, workdir)
    _print_memory_plan(run)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.checkpoint.keep,
                                async_save=c.checkpoint.async_save, owner=True)
    writer, stop = None, _StopFlag()
    stop.install()
    try:
        # --- resume from the newest checkpoint, or begin: warm start, evaluate, checkpoint step 0
        writer, (start_step, state, ref_params, eval_before) = _resume_or_begin(run, checkpointer, workdir)
        summary: dict[str, Any] = {"workdir": workdir, "eval_before": eval_before}
        collector, late, monitor = Collector(run), _LateMetrics(writer, checkpointer, c), HackMonitor()

        last_step = start_step
        for step in range(start_step + 1, c.train.num_steps + 1):
            # --- rollout, score, advantages (this process's block; rewards gathered)
            started = time.perf_counter()
            try:
                batch, row = collector.collect(state, step)
            finally:  # the previous step's metrics (the rollout waited for its update), even
                late.flush()  # when this step's rewards all failed
            # --- update
            state, device_metrics = run.train_step(state, batch, ref_params)
            # The next rollout samples from these weights anyway; waiting here keeps a second
            # multi-device program (a gather, the sampler) from starting while the step runs:
            # XLA:CPU runs devices on one thread pool, and two collective programs in flight
            # can deadlock when devices outnumber threads.
            jax.block_until_ready(state.params)
            row["step_time"] = time.perf_counter() - started
            # --- log (one step late), evaluate, checkpoint, stop
            late.hold(step, device_metrics, row)
            last_step = step
            if step % c.train.eval_every == 0 or step == c.train.num_steps:
                late.flush()
                summary["eval_after"] = _evaluate(run, writer, state.params, step, lambda s, acc: monitor.check_rollout(
                    s, *collector.last, acc))
            signalled = stop.signalled()
            stopping = signalled or step == stop_after
            if step % c.checkpoint.every == 0 or step == c.train.num_steps or stopping:
                late.flush()
                _save(checkpointer, step, state, ref_params, eval_before, run.warm_base())
            if stopping:
                checkpointer.wait()
                print(f"stopped by {stop.why(signalled)} after step {step}; checkpoint saved under "
                      f"{checkpointer.directory}", flush=True)
                break
        # --- finish
        late.flush()
        checkpointer.wait()
        return _finish(summary, workdir, state, last_step, c.train.num_steps)
    finally:
        stop.restore()
        if writer is not None:
            writer.close()
        checkpointer.close()


def _resume_or_begin(run: Run, checkpointer: Checkpointer, workdir: str):
    """The metrics writer and (start step, state, reference params, eval before) of the newest
    checkpoint, or of a new start (`_begin`); what a killed run logged past it is rewound."""
    resumed = restore(run, checkpointer) if checkpointer.latest_step() is not None else None
    restored_step = None if resumed is None else resumed[0]
    if jax.process_index() == 0:
        workdir_lib.rewind(workdir, restored_step)
    rollout_store.rewind(workdir, restored_step, process_index=jax.process_index())
    writer = MetricsWriter(workdir, total_steps=run.config.train.num_steps,
                           purge_step=0 if restored_step is None else restored_step + 1)
    try:
        return writer, (_begin(run, writer, checkpointer) if resumed is None else _resumed(resumed, checkpointer))
    except BaseException:
        writer.close()
        raise


def _finish(summary, workdir: str, state, last_step: int, num_steps: int) -> dict[str, Any]:
    """The run's summary; a run resumed after its last evaluation reads `eval_after` back."""
    summary.update({"last_step": last_step, "stopped_early": last_step < num_steps})
    if ("eval_after" not in summary and last_step == num_steps
            and os.path.exists(os.path.join(workdir, "metrics.jsonl"))):
        summary["eval_after"] = next((r for r in reversed(read_metrics(workdir))
                                      if r["step"] == last_step and "eval/accuracy" in r), None)
    summary["state"] = state
    return summary
