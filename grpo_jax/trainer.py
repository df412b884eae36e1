"""`run(config, workdir)`: the GRPO experiment loop.

    build env, tokenizer, model, mesh                       (grpo_jax.components)
    resume from workdir/checkpoints, or warm start (SFT) and evaluate step 0
    for step in 1..num_steps:
        rows     = the step's prompts (a fixed permutation per epoch: a function of the step)
        rollout  = episodes of the current policy, group_size per prompt   (grpo_jax.rollout)
        rewards  = rubric scores (NaN where a reward function failed)
        adv      = group_advantages(rewards)                                (grpo_jax.grpo)
        state    = train_step(state, batch)                                 (grpo_jax.train_step)
        metrics of the previous step are fetched here (one step late: no host sync in the step)
        evaluate every eval_every steps; checkpoint every checkpoint.every steps

Randomness: step s uses fold_in(key(seed), s); rows and keys are functions of the step, so a run
resumed from a checkpoint writes the same metrics as an uninterrupted one (bitwise on CPU; only
wall-clock timings differ). Rows of metrics.jsonl beyond the restored step (written after the
last checkpoint) are dropped on resume.

Failure handling: SIGTERM finishes the current step, saves a checkpoint and returns; a
non-finite loss skips its update (`optax.apply_if_finite`) and stops the run with a
`FloatingPointError` naming the step; a reward function that fails gives NaN for that episode,
which is left out of its group's advantages and counted (`reward_nan_fraction`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import components, config_utils
from grpo_jax import sharding as sharding_lib
from grpo_jax.advantages import group_advantages
from grpo_jax.checkpoint import Checkpointer, abstract_like
from grpo_jax.evaluation import evaluate
from grpo_jax.metrics import MetricsWriter, read_metrics, to_host
from grpo_jax.rollout import check_template, model_sampler, rollout
from grpo_jax.train_step import init_train_state, make_train_step, split_params

log = logging.getLogger(__name__)

_advantages = jax.jit(group_advantages, static_argnums=(1, 2), static_argnames=("return_info",))

# Metrics that measure wall time: the only ones allowed to differ between identical runs.
TIMING_PREFIXES = ("step_time", "time/", "sft/elapsed_s", "eval/time")


def step_rows(num_rows: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """Indices of the training rows of `step` (1-based): a seeded permutation per epoch."""
    start = (step - 1) * per_step
    out = []
    for position in range(start, start + per_step):
        epoch, index = divmod(position, num_rows)
        out.append(np.random.default_rng([seed, epoch]).permutation(num_rows)[index])
    return np.asarray(out)


class _StopFlag:
    """Set by SIGTERM/SIGINT (main thread only); the loop checks it after every step."""

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

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Experiment:
    """Everything `run` builds, exposed for notebooks and tools (`experiments/eval.py`)."""

    def __init__(self, config, workdir: str):
        config_utils.validate(config)
        self.config = config
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.mesh = sharding_lib.mesh_from_config(config.mesh)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        rows = config.train.prompts_per_step * config.rollout.group_size
        micro = config.grpo.micro_batch_size or rows
        if rows % shards or micro % shards:
            raise config_utils.ConfigError(
                f"config.train.prompts_per_step: the batch of {rows} rows (micro-batches of {micro}) must "
                f"split evenly over the {shards} data-parallel devices (mesh data x fsdp)")
        self.env = components.build_env(config.env)
        self.tokenizer = components.build_tokenizer(config, self.env, workdir)
        self.model = components.build_model(config, self.tokenizer, self.mesh if self.mesh.size > 1 else None)
        self.sampling = components.sampling_config(config, self.tokenizer, self.model)
        self.rollout_config = components.rollout_config(config, self.tokenizer)
        self.train_config = components.train_config(config)
        self.eval_config = components.eval_config(config)
        self.train_rows = self.env.dataset("train", n=config.env.num_train, seed=config.env.data_seed)
        self.eval_rows = self.env.dataset("test", n=config.eval.num_examples, seed=config.env.data_seed)
        updates = config.train.num_steps * config.grpo.num_iterations
        self.optimizer = components.optimizer(config, updates)
        self.root_key = jax.random.key(config.seed)
        self.graphdef, _, self.rest = split_params(self.model)
        # The chat template must keep earlier turns unchanged (token-in / token-out rollouts).
        check_template(self.tokenizer, self.env, self.train_rows[0])

    @property
    def step_mesh(self):
        return self.mesh if self.mesh.size > 1 else None

    def policy(self, params):
        return nnx.merge(self.graphdef, params, self.rest)

    def evaluate(self, params, step: int) -> tuple[dict[str, float], str]:
        start = time.perf_counter()
        metrics, text = evaluate(self.env, self.eval_rows, self.tokenizer, self.policy(params),
                                 jax.random.fold_in(jax.random.fold_in(self.root_key, step), 1 << 20),
                                 sampling=self.sampling, rollout_config=self.rollout_config,
                                 config=self.eval_config)
        metrics["eval/time_s"] = time.perf_counter() - start
        return metrics, text

    def init_state(self):
        return init_train_state(self.model, self.optimizer, self.root_key, mesh=self.step_mesh)

    def restore(self, checkpointer: Checkpointer, step: int | None = None):
        """(step, train state, reference params or None, meta) of a checkpoint of this run."""
        template = self.init_state()
        uses_ref = self.config.grpo.beta > 0
        target = {"train": abstract_like(template), "ref": abstract_like(template.params) if uses_ref else None}
        del template
        step, restored, meta = checkpointer.restore(target, step)
        return step, restored["train"], restored["ref"], meta

    def save_policy(self, params, directory: str):
        """Writes the policy as an HF checkpoint directory, with its tokenizer files."""
        import shutil

        from grpo_jax.models import save_hf

        save_hf(self.policy(params), directory)
        if jax.process_index() != 0:
            return
        if hasattr(self.tokenizer, "hf"):
            self.tokenizer.hf.save_pretrained(directory)
        else:  # a trained sentencepiece model: its files next to the weights
            source = os.path.join(self.workdir, "tokenizer")
            for name in os.listdir(source):
                shutil.copy(os.path.join(source, name), directory)

    def warm_start(self, writer: MetricsWriter):
        """Supervised warm start on the env's demonstrations (config.sft), in place."""
        from grpo_jax import sft

        c = self.config.sft
        rows = self.env.dataset("train", n=c.num_demos, seed=self.config.env.data_seed)
        demos = components.demonstrations(self.env, rows, direct_answer_fraction=c.direct_answer_fraction,
                                          seed=self.config.seed)
        data = sft.pack([sft.encode_demonstration(self.tokenizer, p, q) for p, q in demos],
                        self.tokenizer.pad_id)
        if data["tokens"].shape[1] > self.model.config.max_position_embeddings:
            raise config_utils.ConfigError(
                f"config.model.max_position_embeddings: demonstrations need {data['tokens'].shape[1]} positions")

        def log_fn(step, metrics):
            writer.write(0, {**metrics, "sft/step": float(step)})
            writer.progress(step, metrics, prefix="sft step")

        sft.run_sft(self.model, data, sft.SFTConfig(steps=c.steps, batch_size=c.batch_size,
                                                    learning_rate=c.learning_rate, warmup_steps=c.warmup_steps,
                                                    chunk_size=self.config.grpo.chunk_size, log_every=c.log_every),
                    seed=self.config.seed, log_fn=log_fn)


def _rollout_row(result, scores, adv_info, elapsed_s: float) -> dict[str, float]:
    row = {k: float(v) for k, v in result.metrics.items()}
    row.update({k: float(v) for k, v in scores.metrics.items()})
    row["reward"] = float(np.nanmean(scores.rewards)) if np.isfinite(scores.rewards).any() else float("nan")
    row["reward_std"] = float(np.nanstd(scores.rewards)) if np.isfinite(scores.rewards).any() else float("nan")
    row["completion_length"] = row.get("completion_length/mean", float("nan"))
    row["frac_reward_zero_std"] = float(adv_info["frac_reward_zero_std"])
    row["num_nan_rewards"] = float(adv_info["num_nan_rewards"])
    row["time/rollout_s"] = elapsed_s
    return row


def _truncate_metrics(workdir: str, step: int):
    """Drops rows after `step` (written after the checkpoint a resumed run starts from)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    rows = [r for r in read_metrics(workdir) if r["step"] <= step]
    with open(path + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def run(config, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
    """Trains with GRPO as `config` says, writing metrics and checkpoints under `workdir`.

    `stop_after=s` stops after step s as SIGTERM would (checkpoint saved): a run sliced into
    time-limited jobs, or a test of resumption. Returns a summary: the evaluation before GRPO
    (`eval_before`), after it (`eval_after`), the last step, and `stopped_early`.
    """
    exp = Experiment(config, workdir)
    c = config
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.checkpoint.keep,
                                async_save=c.checkpoint.async_save)
    writer = MetricsWriter(workdir, total_steps=c.train.num_steps)
    uses_ref = c.grpo.beta > 0
    summary: dict[str, Any] = {"workdir": workdir}
    stop = _StopFlag()
    stop.install()
    try:
        start_step = checkpointer.latest_step()
        if start_step is None:
            if c.sft.steps > 0:
                exp.warm_start(writer)
            state = exp.init_state()
            ref_params = jax.tree.map(jnp.copy, state.params) if uses_ref else None
            eval_row, text = exp.evaluate(state.params, 0)
            writer.write(0, eval_row)
            writer.progress(0, eval_row, prefix="eval at step")
            writer.log_text("samples.txt", f"=== step 0\n{text}")
            summary["eval_before"] = eval_row
            checkpointer.save(0, {"train": state, "ref": ref_params}, {"step": 0, "eval_before": eval_row},
                              force=True)
            start_step = 0
        else:
            start_step, state, ref_params, meta = exp.restore(checkpointer)
            summary["eval_before"] = meta.get("eval_before")
            _truncate_metrics(workdir, start_step)
            log.info("resumed from the checkpoint of step %d", start_step)
            print(f"resumed from step {start_step} ({checkpointer.directory})", flush=True)

        step_fn = make_train_step(exp.model, exp.optimizer, exp.train_config, mesh=exp.step_mesh)
        pending = None  # (step, device metrics, host row) of the step whose metrics are in flight

        def flush():
            nonlocal pending
            if pending is None:
                return
            step, device_metrics, row = pending
            pending = None
            row.update(to_host(device_metrics))
            if not (math.isfinite(row.get("loss", 0.0)) and math.isfinite(row.get("grad_norm", 0.0))):
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {step} (loss={row.get('loss')}, grad_norm="
                    f"{row.get('grad_norm')}): its update was skipped and training stopped; the last "
                    f"checkpoint is step {checkpointer.latest_step()} under {checkpointer.directory}")
            writer.write(step, row)
            if step % c.train.log_every == 0 or step == c.train.num_steps:
                writer.progress(step, row)

        last_step = start_step
        for step in range(start_step + 1, c.train.num_steps + 1):
            started = time.perf_counter()
            key = jax.random.fold_in(exp.root_key, step)
            rows = [exp.train_rows[i] for i in step_rows(len(exp.train_rows), step, c.train.prompts_per_step,
                                                         c.env.data_seed)]
            sampler = model_sampler(exp.policy(state.params), exp.sampling)
            result = rollout(exp.env, rows, exp.tokenizer, sampler, key, exp.rollout_config)
            rollout_s = time.perf_counter() - started
            flush()  # the rollout above already waited for the previous update
            scores = result.score(exp.env)
            rewards = jnp.asarray(np.asarray(scores.rewards, np.float32))
            advantages, adv_info = _advantages(rewards, c.rollout.group_size, c.grpo.advantage_scale,
                                               return_info=True)
            batch = {"tokens": result.tokens, "positions": result.positions, "segment_ids": result.segment_ids,
                     "loss_mask": result.loss_mask, "old_logps": result.logprobs, "advantages": advantages}
            state, device_metrics = step_fn(state, batch, ref_params)
            row = _rollout_row(result, scores, jax.device_get(adv_info), rollout_s)
            row["step_time"] = time.perf_counter() - started
            pending = (step, device_metrics, row)
            last_step = step

            if step % c.train.eval_every == 0 or step == c.train.num_steps:
                flush()
                eval_row, text = exp.evaluate(state.params, step)
                writer.write(step, eval_row)
                writer.progress(step, eval_row, prefix="eval at step")
                writer.log_text("samples.txt", f"=== step {step}\n{text}")
                summary["eval_after"] = eval_row
            stopping = stop.signal is not None or step == stop_after
            if step % c.checkpoint.every == 0 or step == c.train.num_steps or stopping:
                flush()
                checkpointer.save(step, {"train": state, "ref": ref_params},
                                  {"step": step, "eval_before": summary.get("eval_before")}, force=True)
            if stopping:
                checkpointer.wait()
                why = f"signal {stop.signal}" if stop.signal is not None else "stop_after"
                print(f"stopped by {why} after step {step}; checkpoint saved under "
                      f"{checkpointer.directory}", flush=True)
                break
        flush()
        checkpointer.wait()
        summary.update({"last_step": last_step, "stopped_early": last_step < c.train.num_steps})
        if "eval_after" not in summary and last_step == c.train.num_steps:
            summary["eval_after"] = next((r for r in reversed(read_metrics(workdir))
                                          if r["step"] == last_step and "eval/accuracy" in r), None)
        summary["state"] = state
        return summary
    finally:
        stop.restore()
        writer.close()
        checkpointer.close()
