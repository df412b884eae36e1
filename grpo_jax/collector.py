"""The step's train batch: roll out, score, gather, advantages, store, pack (`Collector`).

    rows      = the step's prompts (a fixed permutation per epoch: a function of the step)
    rollout   = episodes of the sampling policy, group_size per prompt       (grpo_jax.rollout)
    rewards   = rubric scores (NaN where a reward function failed), gathered over processes
    [grpo.dynamic_sampling: groups whose rewards do not vary are dropped and further rounds of
     prompts rolled out until prompts_per_step groups vary (DAPO, Yu et al. 2025), at most
     grpo.max_sampling_rounds rollouts; short of that, dropped groups fill the batch, counted]
    adv       = advantages of the batch's episodes:                          (`step_advantages`)
                  group_advantages(rewards)                      grpo.credit = "episode"
                  multi_reward_advantages(per-function scores)   grpo.multi_reward = "normalize_then_sum"
                  turn_advantages(turn rewards) on each turn's tokens        grpo.credit = "turn"
    stored    = the episodes, scores, advantages: workdir/rollouts/    (grpo_jax.rollout_store)
    batch     = the episodes packed into rows of rollout.max_seq_len   (grpo_jax.packing)
                (grpo.pack = False: one episode per row)

The step's logged rollout and reward metrics are those of its regular prompts (the first round),
so curves with and without dynamic sampling compare; `dynamic/*` say what the refill did and
`dynamic/batch_reward` is the trained batch's mean reward.

Several processes: process p rolls out its contiguous block of each round's prompts (episodes
numbered by their global ids, so the samples are those of a one-process run); the per-episode
rewards, scores and statistics are gathered, so every process selects the same groups and
computes the whole batch's advantages, and p packs its own selected episodes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import credit, distributed, guard, packing, rollout_store
from grpo_jax import sharding as sharding_lib
from grpo_jax.advantages import group_advantages, multi_reward_advantages
from grpo_jax.envs.base import turn_rewards_from_states
from grpo_jax.rollout import model_sampler, rollout
from grpo_jax.rubrics.rubric import RubricScores, check_rewards, rubric_weights, score_metrics
from grpo_jax.trajectories import Rollout, metrics_from_stats

log = logging.getLogger(__name__)

_advantages = jax.jit(group_advantages, static_argnums=(1, 2), static_argnames=("return_info", "baseline"))


def step_rows(num_rows: int, step: int, per_step: int, seed: int, round_: int = 0) -> np.ndarray:
    """Indices of the training rows of `step` (1-based): a seeded permutation per epoch. Refill
    rounds (`round_` > 0, dynamic sampling) draw their own seeded sample of the rows."""
    if round_:
        rng = np.random.default_rng([seed, step, round_])
        return rng.choice(num_rows, size=per_step, replace=per_step > num_rows)
    start = (step - 1) * per_step
    out = []
    for position in range(start, start + per_step):
        epoch, index = divmod(position, num_rows)
        out.append(np.random.default_rng([seed, epoch]).permutation(num_rows)[index])
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------
# The step's episodes: this process's rollout, gathered over processes.


class Episodes(NamedTuple):
    """What the host needs of a rollout's whole batch (all processes' episodes, global order)."""

    rewards: np.ndarray             # [B] float64, NaN where a reward function failed
    rollout_metrics: dict           # `Rollout.metrics` of all episodes (timings: this process's)
    score_metrics: dict             # `RubricScores.metrics` of all episodes
    width: int                      # T of the batch: the widest process's trajectories
    scores: dict                    # {reward function: [B] unweighted scores}
    turn_rewards: np.ndarray        # [B, K] the env's per-turn rewards (envs.base.turn_rewards_from_states)
    num_turns: np.ndarray           # [B] assistant turns

    def take(self, index: np.ndarray) -> "Episodes":
        """The per-episode arrays at `index` (metrics unchanged)."""
        return self._replace(rewards=self.rewards[index], scores={k: v[index] for k, v in self.scores.items()},
                             turn_rewards=self.turn_rewards[index], num_turns=self.num_turns[index])


def gather_episodes(result: Rollout, scores: RubricScores, max_turns: int) -> Episodes:
    """The rollout's `Episodes` from this process's rollout and scores.

    One process: its own values. Several: every process's `episode_summary` is gathered and
    merged (`merge_episodes`), so the numbers are those of one process holding every episode
    (timings aside: those are this process's).
    """
    if not distributed.is_multiprocess():
        return Episodes(scores.rewards, dict(result.metrics), dict(scores.metrics), result.tokens.shape[1],
                        dict(scores.scores), *_turns(result, max_turns))
    return merge_episodes(distributed.allgather_objects(episode_summary(result, scores, max_turns)),
                          jax.process_index())


def _turns(result: Rollout, max_turns: int) -> tuple[np.ndarray, np.ndarray]:
    num_turns = np.asarray(result.num_turns)
    return turn_rewards_from_states(result.states, num_turns, max_turns), num_turns


def episode_summary(result: Rollout, scores: RubricScores, max_turns: int) -> dict[str, Any]:
    """The per-episode numbers of one process's rollout that the step is made of."""
    m = result.metrics
    turn_rewards, num_turns = _turns(result, max_turns)
    return {"rewards": np.asarray(scores.rewards), "scores": dict(scores.scores),
            "failures": dict(scores.failures), "metrics": dict(scores.metrics),
            "tasks": [s.get("task") for s in result.states], "stats": result.episode_stats(),
            "width": result.tokens.shape[1], "turn_rewards": turn_rewards, "num_turns": num_turns,
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
    scores = _gathered_scores(parts)
    return Episodes(rewards, metrics_from_stats(stats, timing), _score_metrics(parts, rewards, scores),
                    max(p["width"] for p in parts), scores,
                    np.concatenate([p["turn_rewards"] for p in parts]),
                    np.concatenate([p["num_turns"] for p in parts]))


def _gathered_scores(parts) -> dict[str, np.ndarray]:
    names = list(dict.fromkeys(name for p in parts for name in p["scores"]))
    return {name: np.concatenate([p["scores"].get(name, np.full(len(p["rewards"]), np.nan)) for p in parts])
            for name in names}


def _score_metrics(parts, rewards, scores) -> dict[str, float]:
    """`RubricScores.metrics` of the gathered episodes: `rubrics.score_metrics` on the
    concatenated arrays (per task when the processes' metrics have tasks: an `EnvGroup`); a
    metric it does not make is averaged over processes, weighted by episodes."""
    sizes = [len(p["rewards"]) for p in parts]
    failures = {name: sum(p["failures"].get(name, 0) for p in parts) for name in scores}
    tasks = [t for p in parts for t in p["tasks"]]
    keys = list(dict.fromkeys(k for p in parts for k in p["metrics"]))
    grouped = any(f"reward/{t}" in keys for t in set(tasks) if t is not None)
    out = score_metrics(rewards, scores, failures, tasks if grouped else None)
    for key in (k for k in keys if k not in out):
        log.warning("metric %r has no exact multi-process reduction: averaged over processes", key)
        pairs = [(float(p["metrics"][key]), n) for p, n in zip(parts, sizes) if key in p["metrics"]]
        out[key] = sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1)
    return {k: out[k] for k in keys}  # the processes' keys, in their order


# ---------------------------------------------------------------------------------------------
# Dynamic sampling: which groups of which rounds form the batch.


def varying_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """[G] bool: the groups whose valid rewards are not all equal (the ones with a gradient)."""
    rewards_GS = np.asarray(rewards, np.float64).reshape(-1, group_size)
    valid = ~np.isnan(rewards_GS)
    high = np.where(valid, rewards_GS, -np.inf).max(axis=1)
    low = np.where(valid, rewards_GS, np.inf).min(axis=1)
    return (valid.sum(axis=1) > 1) & (high > low)


def select_groups(varying_per_round: list[np.ndarray], target: int) -> tuple[list[tuple[int, int]], int]:
    """The batch's (round, group) pairs: the first `target` varying groups in round order, then,
    when the rounds found fewer, the first groups without variance to fill it. Returns the
    pairs in (round, group) order and how many were filled."""
    varying = [(r, int(g)) for r, v in enumerate(varying_per_round) for g in np.flatnonzero(v)][:target]
    chosen = set(varying)
    fill = [(r, g) for r, v in enumerate(varying_per_round) for g in range(len(v)) if (r, g) not in chosen]
    fill = fill[:target - len(varying)]
    return sorted(varying + fill), len(fill)


class _Round(NamedTuple):
    result: Rollout
    scores: RubricScores
    episodes: Episodes
    seconds: float


def _subset_rollout(parts: list[tuple[Rollout, np.ndarray]], pad_id: int) -> Rollout:
    """One `Rollout` of the episodes `index` of each part, in order, padded to the widest."""
    width = max(r.tokens.shape[1] for r, _ in parts)

    def cat(name, fill=0):
        arrays = [np.asarray(getattr(r, name))[i] for r, i in parts]
        if arrays[0].ndim == 2:
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays]
        return np.concatenate(arrays)

    def items(name):
        return [getattr(r, name)[int(k)] for r, i in parts for k in i]

    first = parts[0][0]
    masked = None if first.masked is None else cat("masked")
    return dataclasses.replace(
        first, tokens=cat("tokens", pad_id),
        loss_mask=cat("loss_mask"), completion_mask=cat("completion_mask"), logprobs=cat("logprobs"),
        positions=cat("positions"), segment_ids=cat("segment_ids"), lengths=cat("lengths"),
        prompt_lengths=cat("prompt_lengths"), prompts=items("prompts"), completions=items("completions"),
        states=items("states"), finish_reasons=items("finish_reasons"), num_turns=cat("num_turns"),
        truncated=cat("truncated"), masked=masked)


def _subset_scores(parts: list[tuple[RubricScores, np.ndarray]]) -> RubricScores:
    rewards = np.concatenate([s.rewards[i] for s, i in parts])
    scores = {k: np.concatenate([s.scores[k][i] for s, i in parts]) for k in parts[0][0].scores}
    failures = {k: int(np.isnan(v).sum()) for k, v in scores.items()}
    return RubricScores(rewards, scores, failures, dict(parts[0][0].errors), score_metrics(rewards, scores, failures))


# ---------------------------------------------------------------------------------------------
# Advantages.


def step_advantages(episodes: Episodes, grpo_config, group_size: int, weights: dict[str, float]):
    """The batch's advantages as `grpo_config` says (module docstring) and the advantage info
    of its rewards (`frac_reward_zero_std`, `num_nan_rewards`). Returns `(episode_advantages
    [B], turn_advantages [B, K] or None, info)`: with credit "turn" the update uses the second
    (each turn's advantage on its tokens), the first is stored with the episodes."""
    g = grpo_config
    advantages, info = _group_advantages(episodes.rewards, group_size, g)
    if g.multi_reward == "normalize_then_sum":
        advantages = np.asarray(multi_reward_advantages(
            episodes.scores, weights, group_size, scale=g.advantage_scale, baseline=g.advantage_baseline),
            np.float32)
    turn = None
    if g.credit == "turn":
        turn = credit.turn_advantages(episodes.turn_rewards, episodes.num_turns, episodes.rewards, group_size,
                                      discount=g.turn_discount, scale=g.advantage_scale)
    return advantages, turn, info


def _group_advantages(rewards, group_size: int, grpo_config) -> tuple[np.ndarray, dict]:
    """`group_advantages` of `rewards` as `grpo_config` scales them, and its info, on the host."""
    rewards = jnp.asarray(np.asarray(rewards, np.float32))
    advantages, info = _advantages(rewards, group_size, grpo_config.advantage_scale, return_info=True,
                                   baseline=grpo_config.advantage_baseline)
    return np.asarray(advantages), jax.device_get(info)


# ---------------------------------------------------------------------------------------------
# The collector.


class Collected(NamedTuple):
    """A step's train batch, its host metrics, and its regular prompts' rollout and scores on
    this process (what the reward-hack monitor reads)."""

    batch: dict[str, Any]
    row: dict[str, float]
    rollout: Rollout
    scores: RubricScores


class Collector:
    """`collect(params, step) -> Collected`: the step's train batch and host metrics, sampled
    from `params` (module docstring)."""

    def __init__(self, run):
        self.run = run
        c = run.config
        self.group_size = c.rollout.group_size
        self.block = distributed.process_block(c.train.prompts_per_step)
        self.weights = rubric_weights(run.env)
        mesh = run.mesh
        shards = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        # A process's packed rows: with the other processes', they split over the data-parallel
        # devices and into whole micro-batches (of every mini-batch).
        micro = (run.train.micro_batch_size or 1) * c.grpo.get("num_mini_batches", 1)
        self.row_multiple = packing.row_multiple(shards, micro, jax.process_count())

    def prompts(self, step: int, round_: int = 0) -> list:
        """This process's block of the rows of `step`'s round (all of them on one process)."""
        c, rows = self.run.config, self.run.train_rows
        chosen = step_rows(len(rows), step, c.train.prompts_per_step, c.env.data_seed, round_)
        return [rows[i] for i in chosen[self.block[0]:self.block[1]]]

    def _round(self, sampler, step: int, round_: int) -> _Round:
        run, c = self.run, self.run.config
        started = time.perf_counter()
        key = jax.random.fold_in(run.root_key, step)
        if round_:
            key = jax.random.fold_in(key, round_)
        result = rollout(run.env, self.prompts(step, round_), run.tokenizer, sampler, key, run.rollout,
                         episode_offset=self.block[0] * self.group_size)
        scores = result.score(run.env)
        episodes = gather_episodes(result, scores, c.rollout.max_turns)
        check_rewards(episodes.rewards, episodes.score_metrics, step=step)
        return _Round(result, scores, episodes, time.perf_counter() - started)

    def collect(self, params, step: int) -> Collected:
        """The step's batch sampled from `params` (the train state's)."""
        return self.collect_with(self.run.sampling_policy(params), step)

    def collect_with(self, policy, step: int) -> Collected:
        """The step's batch sampled from `policy` (a model: `Run.sampling_policy`)."""
        run, c = self.run, self.run.config
        sampler = model_sampler(policy, run.sampling, run.engine)
        rounds = [self._round(sampler, step, 0)]
        target = c.train.prompts_per_step
        if c.grpo.dynamic_sampling:
            while (sum(int(varying_groups(r.episodes.rewards, self.group_size).sum()) for r in rounds) < target
                   and len(rounds) < c.grpo.max_sampling_rounds):
                rounds.append(self._round(sampler, step, len(rounds)))
        first = rounds[0]
        if not c.grpo.dynamic_sampling:
            selected, local, scores, extra = first.episodes, first.result, first.scores, {}
            own = np.arange(len(local)) + self.block[0] * self.group_size
        else:
            selected, local, scores, own, extra = self._select(rounds, step)
        episode_adv, turn_adv, adv_info = step_advantages(selected, c.grpo, self.group_size, self.weights)
        rollout_store.store_step(run, step, local, scores, episode_adv[own], process_index=jax.process_index(),
                                 episode_ids=own)  # train.store_rollouts: workdir/rollouts/
        advantages = episode_adv[own] if turn_adv is None else credit.token_advantages(
            turn_adv[own], local.completion_mask)
        batch, stats = self.train_batch(local, advantages, selected)
        if extra:  # the regular prompts' statistics, as a step without dynamic sampling logs them
            adv_info = _group_advantages(first.episodes.rewards, self.group_size, c.grpo)[1]
        row = {**_rollout_row(first.episodes, adv_info, sum(r.seconds for r in rounds)), **stats, **extra}
        return Collected(batch, row, first.result, first.scores)

    def _select(self, rounds: list[_Round], step: int):
        """The dynamic-sampling batch: (Episodes of the selected groups, this process's selected
        rollout and scores, their positions in the batch, dynamic/* metrics)."""
        g, target = self.group_size, self.run.config.train.prompts_per_step
        varying = [varying_groups(r.episodes.rewards, g) for r in rounds]
        chosen, filled = select_groups(varying, target)
        if filled:
            log.warning("step %d: %d of %d groups vary after %d rollouts (grpo.max_sampling_rounds): "
                        "%d groups without variance fill the batch", step, target - filled, target,
                        len(rounds), filled)
        index = {r: [] for r in range(len(rounds))}  # per round: the chosen global episodes
        for r, group in chosen:
            index[r].extend(range(group * g, (group + 1) * g))
        selected = _concat_episodes([rounds[r].episodes.take(np.asarray(index[r], int)) for r in index])
        lo, hi = self.block[0] * g, self.block[1] * g  # this process's episodes in each round
        local_index = {r: np.asarray([i - lo for i in index[r] if lo <= i < hi], int) for r in index}
        own = np.asarray([k * g + j for k, (r, group) in enumerate(chosen) if lo <= group * g < hi for j in range(g)],
                         int)  # in the order of `local`: chosen is in (round, group) order
        local = _subset_rollout([(rounds[r].result, local_index[r]) for r in index], self.run.rollout.pad_id)
        scores = _subset_scores([(rounds[r].scores, local_index[r]) for r in index])
        extra = {"dynamic/rounds": float(len(rounds)), "dynamic/groups_sampled": float(sum(len(v) for v in varying)),
                 "dynamic/groups_varying": float(sum(int(v.sum()) for v in varying)),
                 "dynamic/groups_filled": float(filled),
                 "dynamic/batch_reward": float(np.nanmean(selected.rewards)) if np.isfinite(selected.rewards).any()
                 else float("nan")}
        return selected, local, scores, own, extra

    def train_batch(self, result: Rollout, advantages, episodes: Episodes) -> tuple[dict[str, Any], dict[str, float]]:
        """The train step's batch and its padding stats (`packing.padding_stats`, of the whole
        batch): this process's trajectories, packed (grpo.pack) or one per row (padded to the
        widest of any process), with their advantages ([N] per episode or [N, T] per token)."""
        c, pad_id, multiprocess = self.run.config, self.run.rollout.pad_id, distributed.is_multiprocess()
        count = len(episodes.rewards)
        advantages = np.asarray(advantages, np.float32)
        if c.grpo.pack:
            width = c.rollout.max_seq_len
            batch, _ = packing.pack_rollout(result, advantages, width=width, row_multiple=self.row_multiple,
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
                     "old_logps": result.logprobs, "advantages": advantages}
            if multiprocess:
                batch = {k: np.pad(v, ((0, 0), (0, width - v.shape[1])) + ((0, 0),) * (v.ndim - 2),
                                   constant_values=pad_id if k == "tokens" else 0) if v.ndim == 2 else v
                         for k, v in batch.items()}
        real_tokens = int(np.sum(result.lengths))
        if multiprocess:
            real_tokens = sum(distributed.allgather_objects(real_tokens))
        stats = packing.padding_stats(real_tokens, rows, width, count, episodes.width)
        if not multiprocess:
            return batch, stats
        mesh = self.run.mesh
        return distributed.global_batch(batch, lambda ndim: sharding_lib.batch_sharding(mesh, ndim),
                                        rows), stats


def _concat_episodes(parts: list[Episodes]) -> Episodes:
    first = parts[0]
    return first._replace(
        rewards=np.concatenate([p.rewards for p in parts]),
        scores={k: np.concatenate([p.scores[k] for p in parts]) for k in first.scores},
        turn_rewards=np.concatenate([p.turn_rewards for p in parts]),
        num_turns=np.concatenate([p.num_turns for p in parts]),
        width=max(p.width for p in parts))


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
