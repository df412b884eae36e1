"""`run(config, workdir)`: the GRPO experiment loop.

    run = build(config, workdir)         env, tokenizer, model, mesh, settings, train step
                                                                            (grpo_jax.components)
    resume from workdir/checkpoints, or warm start (grpo_jax.sft) and evaluate step 0
    for step in 1..num_steps:
        collected = queue.get(step, state.params):                    (grpo_jax.overlap)
            the step's episodes sampled from the current weights (train.staleness = 0), or
            queued k updates earlier and rolled out while the updates ran (staleness = k);
            scored, gathered, [dynamic sampling: refilled], advantages, stored and packed
            (`grpo_jax.collector.Collector`)
        state    = run.train_step(state, collected.batch)                   (grpo_jax.train_step)
        the reference becomes the policy every grpo.ref_sync_every steps (beta > 0)
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
contiguous block of the step's prompts on its own devices (`grpo_jax.collector`: the per-episode
rewards and statistics are gathered, advantages come from the gathered rewards), and each
process's rows become its block of the global batch of the compiled step.
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
from typing import Any

import jax
import jax.numpy as jnp

from grpo_jax import config_utils, distributed, rollout_store
from grpo_jax import workdir as workdir_lib
from grpo_jax.checkpoint import Checkpointer
from grpo_jax.collector import Collector
from grpo_jax.components import Run, build, restore
from grpo_jax.evaluation import evaluate_run
from grpo_jax.memory import plan_for_run
from grpo_jax.metrics import MetricsWriter, read_metrics, to_host
from grpo_jax.models import lora
from grpo_jax.overlap import RolloutQueue, check_overlap
from grpo_jax.rubrics.monitor import HackMonitor
from grpo_jax.sft import cached_warm_start

log = logging.getLogger(__name__)

# Metrics that measure wall time: the only ones allowed to differ between identical runs.
TIMING_PREFIXES = ("step_time", "time/", "sft/elapsed_s", "eval/time")
# How the train batch was laid out: a multi-process run packs each process's episodes apart, so
# these differ from a one-process run of the same episodes (its update does not).
LAYOUT_METRICS = ("train/padding_frac", "train/rows")


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


def _synced_reference(ref_params, params, step: int, every: int):
    """The reference after `step`: a copy of the policy every `every` steps (grpo.ref_sync_every),
    else unchanged (none without beta > 0)."""
    if ref_params is None or not every or step % every:
        return ref_params
    return jax.tree.map(jnp.copy, params)


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
        cached_warm_start(run, writer)
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
    check_overlap(config)
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
    writer, stop, queue = None, _StopFlag(), None
    stop.install()
    try:
        # --- resume from the newest checkpoint, or begin: warm start, evaluate, checkpoint step 0
        writer, (start_step, state, ref_params, eval_before) = _resume_or_begin(run, checkpointer, workdir)
        summary: dict[str, Any] = {"workdir": workdir, "eval_before": eval_before}
        late, monitor = _LateMetrics(writer, checkpointer, c), HackMonitor()
        queue = RolloutQueue(Collector(run), c.train.get("staleness", 0), c.train.num_steps)

        last_step = start_step
        for step in range(start_step + 1, c.train.num_steps + 1):
            # --- rollout, score, advantages (this process's block; rewards gathered), sampled
            # from the current weights or, with train.staleness = k, up to k updates older
            started = time.perf_counter()
            try:
                collected = queue.get(step, state.params)
            finally:  # the previous step's metrics (the rollout waited for its update), even
                late.flush()  # when this step's rewards all failed
            row = collected.row
            # --- update
            state, device_metrics = run.train_step(state, collected.batch, ref_params)
            # The next rollout samples from these weights anyway; waiting here keeps a second
            # multi-device program (a gather, the sampler) from starting while the step runs:
            # XLA:CPU runs devices on one thread pool, and two collective programs in flight
            # can deadlock when devices outnumber threads.
            jax.block_until_ready(state.params)
            row["step_time"] = time.perf_counter() - started
            ref_params = _synced_reference(ref_params, state.params, step, c.grpo.get("ref_sync_every", 0))
            # --- log (one step late), evaluate, checkpoint, stop
            late.hold(step, device_metrics, row)
            last_step = step
            if step % c.train.eval_every == 0 or step == c.train.num_steps:
                late.flush()
                summary["eval_after"] = _evaluate(run, writer, state.params, step, lambda s, acc: monitor.check_rollout(
                    s, collected.rollout, collected.scores, acc))
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
        if queue is not None:  # its worker stops before the writer closes
            queue.close()
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
