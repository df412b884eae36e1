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
rewards, and each process's rows become its block of the global batch of the compiled step.
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
from flax import nnx

from grpo_jax import components, config_utils, distributed
from grpo_jax import sharding as sharding_lib
from grpo_jax import workdir as workdir_lib
from grpo_jax.advantages import group_advantages
from grpo_jax.checkpoint import Checkpointer, abstract_like
from grpo_jax.evaluation import evaluate
from grpo_jax.metrics import MetricsWriter, read_metrics, to_host
from grpo_jax.rollout import check_template, model_sampler, rollout
from grpo_jax import guard
from grpo_jax.rubrics.rubric import check_rewards, nan_mean
from grpo_jax.trajectories import metrics_from_stats
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


def check_config(config):
    """The run's mesh, or `ConfigError` naming the field: before anything is built or written."""
    config_utils.validate(config)
    processes = jax.process_count()
    if config.train.prompts_per_step % processes:
        raise config_utils.ConfigError(
            f"config.train.prompts_per_step: {config.train.prompts_per_step} prompts do not split "
            f"evenly over {processes} processes (each rolls out whole groups)")
    mesh = sharding_lib.mesh_from_config(config.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = config.train.prompts_per_step * config.rollout.group_size
    micro = config.grpo.micro_batch_size or rows
    if rows % shards or micro % shards:
        raise config_utils.ConfigError(
            f"config.train.prompts_per_step: the batch of {rows} rows (micro-batches of {micro}) must "
            f"split evenly over the {shards} data-parallel devices (mesh data x fsdp)")
    return mesh


class Experiment:
    """Everything `run` builds, exposed for notebooks and tools (`experiments/eval.py`)."""

    def __init__(self, config, workdir: str):
        self.mesh = check_config(config)
        self.config = config
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        # This process's prompts of each step, and the global id of their first episode.
        self.prompt_block = distributed.process_block(config.train.prompts_per_step)
        self.episode_offset = self.prompt_block[0] * config.rollout.group_size
        self.env = components.build_env(config.env)
        self.tokenizer = self._build_tokenizer()
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

    def _build_tokenizer(self):
        """The tokenizer; a trained one is trained by process 0 and read back by the others."""
        if not distributed.is_multiprocess():
            return components.build_tokenizer(self.config, self.env, self.workdir)
        first = jax.process_index() == 0
        tokenizer = components.build_tokenizer(self.config, self.env, self.workdir) if first else None
        distributed.barrier("tokenizer")
        return tokenizer or components.build_tokenizer(self.config, self.env, self.workdir)

    def memory_plan(self):
        """`grpo_jax.memory.plan_memory` of this run: its model, mesh, optimizer and batch."""
        from grpo_jax.memory import GIB, plan_memory

        c = self.config
        rows = c.train.prompts_per_step * c.rollout.group_size
        stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)() or {}
        limit = stats.get("bytes_limit")
        return plan_memory(self.model.config, dict(self.mesh.shape), optimizer=self.optimizer,
                           with_reference=c.grpo.beta > 0, kv_batch=rows, kv_length=c.rollout.max_seq_len,
                           gather_weights=c.sampling.gather_weights,
                           train_batch=c.grpo.micro_batch_size or rows, train_seq=c.rollout.max_seq_len,
                           chunk_size=self.train_config.chunk_size,
                           device_memory_gib=limit / GIB if limit else None,
                           label=c.model.hf_path or f"{self.model.config.model_type} from the config")

    @property
    def step_mesh(self):
        return self.mesh if self.mesh.size > 1 else None

    def policy(self, params):
        return nnx.merge(self.graphdef, params, self.rest)

    def sampling_policy(self, params):
        """The policy rollouts sample from. One process: the train state's own weights. Several:
        a copy on this process's devices (`distributed.local_copy`), so that each process samples
        its share of the episodes on its own, turn by turn, without waiting for the others."""
        if not distributed.is_multiprocess():
            return self.policy(params)
        return nnx.merge(self.graphdef, distributed.local_copy(params, self.mesh),
                         distributed.local_copy(self.rest, self.mesh))

    def evaluate(self, params, step: int) -> tuple[dict[str, float], str]:
        """Held-out metrics of `params` (every process calls it; see `evaluation.evaluate`)."""
        start = time.perf_counter()
        metrics, text = evaluate(self.env, self.eval_rows, self.tokenizer, self.sampling_policy(params),
                                 jax.random.fold_in(jax.random.fold_in(self.root_key, step), 1 << 20),
                                 sampling=self.sampling, rollout_config=self.rollout_config,
                                 config=self.eval_config)
        metrics["eval/time_s"] = time.perf_counter() - start
        return metrics, text

    def step_prompts(self, step: int) -> list:
        """This process's block of the rows of `step` (all of them on one process)."""
        c = self.config
        chosen = step_rows(len(self.train_rows), step, c.train.prompts_per_step, c.env.data_seed)
        start, stop = self.prompt_block
        return [self.train_rows[i] for i in chosen[start:stop]]

    def train_batch(self, result, advantages, width: int) -> dict[str, Any]:
        """The train step's batch: this process's trajectories (padded to `width`, the widest of
        any process) and its rows of `advantages` ([B], the whole batch's), as global arrays."""
        batch = {"tokens": result.tokens, "positions": result.positions, "segment_ids": result.segment_ids,
                 "loss_mask": result.loss_mask, "old_logps": result.logprobs}
        if not distributed.is_multiprocess():
            return {**batch, "advantages": advantages}
        pad_id = self.rollout_config.pad_id
        batch = {k: np.pad(v, ((0, 0), (0, width - v.shape[1])),
                           constant_values=pad_id if k == "tokens" else 0) for k, v in batch.items()}
        start = self.episode_offset
        batch["advantages"] = np.asarray(advantages)[start:start + len(result)]
        rows = len(advantages)
        return distributed.global_batch(batch, lambda ndim: sharding_lib.batch_sharding(self.mesh, ndim), rows)

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
        """Supervised warm start (config.sft), in place: `steps` on the env's gold demonstrations,
        then `mixed_steps` on demonstrations of which `direct_answer_fraction` skip the tool (with
        `mixed_trained_tokens`, only their first completion tokens carry loss)."""
        from grpo_jax import sft

        c = self.config.sft
        rows = self.env.dataset("train", n=c.num_demos, seed=self.config.env.data_seed)
        stages = [("gold", 0.0, c.steps, c.learning_rate, self.config.seed, None)]
        if c.mixed_steps:
            stages.append(("mixed", c.direct_answer_fraction, c.mixed_steps, c.mixed_learning_rate,
                           self.config.seed + 1, c.mixed_trained_tokens or None))
        done, total = 0, sum(stage[2] for stage in stages)
        for name, fraction, steps, learning_rate, seed, trained_tokens in stages:
            if not steps:
                continue
            demos = components.demonstrations(self.env, rows, direct_answer_fraction=fraction, seed=seed)
            data = sft.pack([sft.encode_demonstration(self.tokenizer, p, q, trained_tokens) for p, q in demos],
                            self.tokenizer.pad_id)
            if data["tokens"].shape[1] > self.model.config.max_position_embeddings:
                raise config_utils.ConfigError(f"config.model.max_position_embeddings: demonstrations "
                                               f"need {data['tokens'].shape[1]} positions")

            def log_fn(step, metrics, offset=done, name=name):
                writer.write(0, {**metrics, "sft/step": float(offset + step)})
                if writer.is_writer:
                    print(f"sft ({name}) step {offset + step}/{total} | loss {metrics['sft/loss']:.3f} | "
                          f"confident tokens {metrics['sft/token_confident']:.2f} | "
                          f"{metrics['sft/elapsed_s']:.0f}s", flush=True)

            sft.run_sft(self.model, data, sft.SFTConfig(
                steps=steps, batch_size=c.batch_size, learning_rate=learning_rate,
                warmup_steps=min(c.warmup_steps, steps // 2), chunk_size=self.train_config.chunk_size,
                log_every=c.log_every), seed=seed, log_fn=log_fn)
            done += steps


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
                       "sampler_calls": m["sampler_calls"]}}


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
    """`RubricScores.metrics` of the gathered episodes: "reward", "reward_nan_fraction",
    "reward/<function>", "failures/<function>" and (task groups) "reward/<task>", recomputed
    on the concatenated arrays; any other key is averaged, weighted by episodes."""
    sizes = [len(p["rewards"]) for p in parts]
    names = list(dict.fromkeys(name for p in parts for name in p["scores"]))
    scores = {name: np.concatenate([p["scores"].get(name, np.full(n, np.nan)) for p, n in zip(parts, sizes)])
              for name in names}
    tasks = np.asarray([t for p in parts for t in p["tasks"]], dtype=object)
    out = {}
    for key in dict.fromkeys(k for p in parts for k in p["metrics"]):
        name = key.split("/", 1)[1] if "/" in key else None
        if key == "reward":
            out[key] = nan_mean(rewards)
        elif key == "reward_nan_fraction":
            out[key] = float(np.isnan(rewards).mean()) if len(rewards) else 0.0
        elif key.startswith("failures/") and name in scores:
            out[key] = float(sum(p["failures"].get(name, 0) for p in parts))
        elif key.startswith("reward/") and name in scores:
            out[key] = nan_mean(scores[name])
        elif key.startswith("reward/") and name in set(tasks):
            out[key] = nan_mean(rewards[tasks == name])
        else:
            log.warning("metric %r has no exact multi-process reduction: averaged over processes", key)
            pairs = [(float(p["metrics"][key]), n) for p, n in zip(parts, sizes) if key in p["metrics"]]
            out[key] = sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1)
    return out


def _rollout_row(episodes: Episodes, adv_info, elapsed_s: float) -> dict[str, float]:
    rewards = episodes.rewards
    row = {k: float(v) for k, v in episodes.rollout_metrics.items()}
    row.update({k: float(v) for k, v in episodes.score_metrics.items()})
    row["reward"] = float(np.nanmean(rewards)) if np.isfinite(rewards).any() else float("nan")
    row["reward_std"] = float(np.nanstd(rewards)) if np.isfinite(rewards).any() else float("nan")
    row["completion_length"] = row.get("completion_length/mean", float("nan"))
    row["frac_reward_zero_std"] = float(adv_info["frac_reward_zero_std"])
    row["num_nan_rewards"] = float(adv_info["num_nan_rewards"])
    row["time/rollout_s"] = elapsed_s
    # Reward / tool workers killed or crashed and threads left running, since the process started
    # (workers started is left out: a resumed process starts its own).
    row.update({k: float(v) for k, v in guard.stats().items() if k != "guard/started_workers"})
    return row


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


def run(config, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
    """Trains with GRPO as `config` says, writing metrics and checkpoints under `workdir`.

    `stop_after=s` stops after step s as SIGTERM would (checkpoint saved): a run sliced into
    time-limited jobs, or a test of resumption. Returns a summary: the evaluation before GRPO
    (`eval_before`), after it (`eval_after`), the last step, and `stopped_early`.
    """
    check_config(config)
    held = claim_workdir(config, workdir)
    try:
        return _run(config, workdir, stop_after)
    finally:
        if held is not None:
            held.release()


def _run(config, workdir: str, stop_after: int | None) -> dict[str, Any]:
    """`run` in a workdir this process has claimed."""
    exp = Experiment(config, workdir)
    c = config
    if jax.process_index() == 0:
        try:
            print(exp.memory_plan().table(), flush=True)
        except Exception as error:  # noqa: BLE001  (the plan informs; it must not stop a run)
            log.warning("no memory plan for this config: %s: %s", type(error).__name__, error)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.checkpoint.keep,
                                async_save=c.checkpoint.async_save, owner=True)
    writer = None
    uses_ref = c.grpo.beta > 0
    summary: dict[str, Any] = {"workdir": workdir}
    stop = _StopFlag()
    stop.install()
    try:
        start_step = None
        if checkpointer.latest_step() is not None:
            start_step, state, ref_params, meta = exp.restore(checkpointer)
        if jax.process_index() == 0:  # what a killed run logged past the start goes
            workdir_lib.rewind(workdir, start_step)
        writer = MetricsWriter(workdir, total_steps=c.train.num_steps,
                               purge_step=0 if start_step is None else start_step + 1)
        if start_step is None:
            if c.sft.steps > 0 or c.sft.mixed_steps > 0:
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
            summary["eval_before"] = meta.get("eval_before")
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
            sampler = model_sampler(exp.sampling_policy(state.params), exp.sampling)
            result = rollout(exp.env, exp.step_prompts(step), exp.tokenizer, sampler, key, exp.rollout_config,
                             episode_offset=exp.episode_offset)
            rollout_s = time.perf_counter() - started
            flush()  # the rollout above already waited for the previous update
            episodes = gather_episodes(result, result.score(exp.env))
            check_rewards(episodes.rewards, episodes.score_metrics, step=step)
            rewards = jnp.asarray(np.asarray(episodes.rewards, np.float32))
            advantages, adv_info = _advantages(rewards, c.rollout.group_size, c.grpo.advantage_scale,
                                               return_info=True)
            batch = exp.train_batch(result, advantages, episodes.width)
            state, device_metrics = step_fn(state, batch, ref_params)
            row = _rollout_row(episodes, jax.device_get(adv_info), rollout_s)
            # The next rollout samples from these weights anyway; waiting here keeps a second
            # multi-device program (a gather, the sampler) from starting while the step runs:
            # XLA:CPU runs devices on one thread pool, and two collective programs in flight
            # can deadlock when devices outnumber threads.
            jax.block_until_ready(state.params)
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
            signalled = stop.signal is not None
            if distributed.is_multiprocess():  # all processes stop together, or none
                signalled = distributed.any_process(signalled)
            stopping = signalled or step == stop_after
            if step % c.checkpoint.every == 0 or step == c.train.num_steps or stopping:
                flush()
                checkpointer.save(step, {"train": state, "ref": ref_params},
                                  {"step": step, "eval_before": summary.get("eval_before")}, force=True)
            if stopping:
                checkpointer.wait()
                why = ("stop_after" if not signalled else f"signal {stop.signal}" if stop.signal is not None
                       else "a signal to another process")
                print(f"stopped by {why} after step {step}; checkpoint saved under "
                      f"{checkpointer.directory}", flush=True)
                break
        flush()
        checkpointer.wait()
        summary.update({"last_step": last_step, "stopped_early": last_step < c.train.num_steps})
        if ("eval_after" not in summary and last_step == c.train.num_steps
                and os.path.exists(os.path.join(workdir, "metrics.jsonl"))):
            summary["eval_after"] = next((r for r in reversed(read_metrics(workdir))
                                          if r["step"] == last_step and "eval/accuracy" in r), None)
        summary["state"] = state
        return summary
    finally:
        stop.restore()
        if writer is not None:
            writer.close()
        checkpointer.close()
