"""The multi-step rollout: many episodes at once, tokens in / tokens out.

`rollout(env, rows, tokenizer, sampler, key, config)` plays `config.group_size` episodes per
row and returns a `Rollout` (see `grpo_jax.trajectories`). Two ways to drive the turns, the same
episodes either way (same keys, same tokens):

- On the engine (`model_sampler(model, sampling, engine_config)`, `rollout.mode = "engine"`):
  every episode is its own coroutine: a turn (`Engine.generate`; a group shares its prompt's
  prefill), the env's reply awaited while the other episodes keep decoding, the reply's tokens
  prefilled onto the episode's kept cache, the next turn (`grpo_jax.engine`, docs/engine.md).
- Lockstep (`model_sampler(model, sampling)`, the baseline): ONE batched sampler call per turn
  for every live episode (turn 0 samples each row's prompt with n = group_size; later turns
  each live episode's whole history with n = 1), then every env reply, then the next turn.

Either way, per episode:

    1. The turn is sampled with the episode's global id (`episode_offset` + its index) as its
       row id and `fold_in(key, turn)` as its key, so its draws do not depend on which episodes
       share its batch or its process.
    2. The sampled ids are appended to the episode as they are (loss mask 1, the sampler's
       log-probs). A turn cut by `max_new_tokens` (no stop token) gets the template's
       end-of-turn ids appended with mask 0 and ends the episode, `state["truncated"] = True`
       (the env protocol in `grpo_jax.envs.base`).
    3. Episodes the env considers complete (or that reached the turn limit) end; for the others
       the env replies (`env_response`; `ToolEnv` runs each tool call in its own thread).
    4. The reply messages are tokenized as a chat-template suffix
       (`tokenizer.encode_turn_suffix`: the text after the end-of-turn token up to the next
       generation prompt) and appended with mask 0. The history is never re-tokenized.

An `AgentEnv` (the user's own agent code on the openai SDK) is played by
`grpo_jax.agent_rollout` instead: its requests to an in-process server become the trajectory.

Native tool calling: an env with a `tool_schemas()` method returning JSON schemas (a `ToolEnv`
with `native_tools=True`) has them rendered by the chat template: the prompt is
`encode_chat(prompt, tools=schemas)`, every env reply suffix and the template check use the
same `tools`, so the history stays token-in / token-out with tools too (`env_tool_schemas`).

The assistant message handed to the env (and kept for the rubric) is
`tokenizer.decode(sampled_ids)` without the trailing stop token, special tokens kept as text
(`skip_special_tokens=False`): the env sees exactly what the model wrote, and re-rendering the
conversation gives back the sampled ids wherever the template is prefix-preserving and the ids
are the tokenizer's own encoding of their text. A turn that ends with another stop token (e.g.
eos where the template writes `<|im_end|>`) keeps that token in the history: the tokens stay
the model's own, and only such a turn differs from a one-go rendering. A template that rewrites
earlier turns (e.g. drops old `<think>` blocks) is refused at the start (`check_template`), with
the reason.

Episode layout (one row of the arrays), two turns with one tool reply:

    tokens     [prompt + gen. prompt][turn 1 + stop][tool suffix + gen. prompt][turn 2 + stop][pad]
    loss mask   0 0 ... 0             1 1 ... 1      0 0 ... 0                  1 1 ... 1      0 ...

How an episode ends (`Rollout.finish_reasons`):
    "completed"        the env ended it (a final answer; a single-turn env after its turn).
    "max_turns"        the turn limit (min of `config.max_turns` and `env.max_turns`) was reached
                       while the env would have continued (e.g. the last turn called a tool).
    "length"           the last turn hit `max_new_tokens` without a stop token.
    "sequence_budget"  the next turn would not fit: its prompt (the history plus the env's reply)
                       + `max_new_tokens` + the end-of-turn ids exceeds `max_seq_len`; the reply
                       that did not fit is dropped from both the tokens and the messages, so
                       the trajectory always fits the context. A row whose prompt alone leaves
                       no room for a turn ends so at once, never sampled.
    "env_error"        `env_response` (or tokenizing its reply, or `is_completed`) raised; the
                       error is logged, counted and kept in `state["env_error"]`; the other
                       episodes carry on.
"length", "sequence_budget" and "max_turns" are truncations (`Rollout.truncated`);
`state["truncated"]` is set for the two token limits (what the env protocol asks for).
`mask_truncated=True` zeroes the loss mask of truncated episodes (DAPO's overlong filtering,
Yu et al. 2025, sec. 3.4); `mask_env_errors=True` does the same for env failures, which are not
the model's doing. `Rollout.completion_mask` keeps every model token either way (for token
rewards and length metrics).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Mapping, Sequence

import jax

from grpo_jax.envs.agent import AgentEnv
from grpo_jax.envs.base import Environment, Message, Row, State, respond_all
from grpo_jax.sampling import STOP_TOKEN, Samples
from grpo_jax.samplers import EngineSampler, ModelSampler, SampleFn, Sampler, model_sampler
from grpo_jax.chat_check import PROBE_COMPLETION, check_template, env_tool_schemas
from grpo_jax.engine import Engine, GenerationParams
from grpo_jax.tokenizer import Tokenizer
from grpo_jax.trajectories import FINISH_REASONS, TRUNCATION_REASONS, Rollout, pack_episodes
from grpo_jax.utils import dataclass_from, run_sync

__all__ = ["FINISH_REASONS", "PROBE_COMPLETION", "TRUNCATION_REASONS", "EngineSampler", "ModelSampler", "Rollout", "RolloutConfig", "SampleFn", "Sampler",
           "check_template", "env_tool_schemas", "model_sampler", "rollout"]

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    group_size: int = 1                # episodes per row (a GRPO group), episodes group-major
    max_turns: int | None = None       # assistant turns; None: env.max_turns (this only lowers it)
    max_new_tokens: int = 256          # sampled tokens per turn (the sampler's max_new_tokens)
    max_seq_len: int = 1024            # sequence budget: an episode's whole token sequence
    mask_truncated: bool = False       # zero the loss mask of truncated episodes (DAPO)
    mask_env_errors: bool = True       # zero the loss mask of episodes whose env failed
    pad_id: int | None = None          # padding id of the arrays; None: tokenizer.pad_id
    length_multiple: int = 32          # T is rounded up to this (fewer train-step compiles)
    check_template: bool = True        # refuse a non-prefix-preserving chat template at start
    # "engine": continuous batching, caches kept across turns (`grpo_jax.engine`); "lockstep": one
    # sampler call per turn for every live episode (the baseline). Read by whoever builds the
    # sampler (`model_sampler`); `rollout` plays whichever it is given.
    mode: str = "engine"

    def __post_init__(self):
        checks = [
            (self.group_size >= 1, "group_size must be >= 1"),
            (self.max_turns is None or self.max_turns >= 1, "max_turns must be None or >= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.max_seq_len > self.max_new_tokens, "max_seq_len must exceed max_new_tokens"),
            (self.length_multiple >= 1, "length_multiple must be >= 1"),
            (self.mode in ("engine", "lockstep"), f"mode must be 'engine' or 'lockstep', got {self.mode!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"rollout config: {message} (got {self})")

    @classmethod
    def from_any(cls, config: "RolloutConfig | Mapping[str, Any] | Any") -> "RolloutConfig":
        """Accepts a RolloutConfig, a dict or a ConfigDict with (a subset of) these fields."""
        return dataclass_from(cls, config, what="rollout config")


# -- the loop ---------------------------------------------------------------------------------
@dataclasses.dataclass
class _Episode:
    row_index: int
    prompt: list[Message]
    state: State
    tokens: list[int]
    mask: list[int]         # 1 on the model's own tokens
    logprobs: list[float]   # the sampler's log-prob of each token, 0 elsewhere
    messages: list[Message]
    num_turns: int = 0
    finish_reason: str | None = None

    def extend(self, ids: Sequence[int], mask: int, logprobs: Sequence[float] | None = None):
        self.tokens.extend(int(i) for i in ids)
        self.mask.extend([mask] * len(ids))
        self.logprobs.extend([0.0] * len(ids) if logprobs is None else [float(x) for x in logprobs])

    def finish(self, reason: str):
        self.finish_reason = reason
        self.state["finish_reason"] = reason
        if reason in ("length", "sequence_budget"):
            self.state["truncated"] = True


def _check_sampler(sampler, config: RolloutConfig, end_of_turn: Sequence[int]):
    max_new, stops = sampler.max_new_tokens, sampler.stop_token_ids
    if isinstance(sampler, EngineSampler) and sampler.engine.config.max_length < config.max_seq_len:
        raise ValueError(f"the engine holds {sampler.engine.config.max_length} positions an episode but the "
                         f"rollout config budgets max_seq_len={config.max_seq_len}; raise engine max_length")
    if max_new != config.max_new_tokens:
        raise ValueError(f"the sampler draws up to {max_new} tokens a turn but the rollout config "
                         f"budgets max_new_tokens={config.max_new_tokens}; make them equal")
    if end_of_turn[0] not in stops:
        raise ValueError(f"the sampler's stop_token_ids {tuple(stops)} lack the chat template's "
                         f"end-of-turn id {end_of_turn[0]}: every turn would run to max_new_tokens")


def _add_turn(episode: _Episode, ids: Sequence[int], logprobs: Sequence[float], stopped: bool,
              tokenizer: Tokenizer, end_of_turn: Sequence[int], max_new_tokens: int):
    """Appends one sampled turn (and, when it was cut, the end-of-turn ids) to `episode`."""
    ids = [int(t) for t in ids]
    n = len(ids)
    if not 1 <= n <= max_new_tokens:
        raise ValueError(f"the sampler returned {n} tokens for a turn; expected 1..{max_new_tokens}")
    episode.extend(ids, 1, logprobs)
    content = tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=False)
    if not stopped:  # close the turn as the template would, so the history stays well formed
        episode.extend(end_of_turn, 0)
        episode.state["truncated"] = True
    episode.messages.append({"role": "assistant", "content": content})
    episode.num_turns += 1
    episode.state["completion_tokens"] = episode.state.get("completion_tokens", 0) + n
    return stopped


def _reason_after_turn(env: Environment, episode: _Episode, stopped: bool, max_turns: int) -> str | None:
    """Why the episode ends after its latest turn, or None when the env should reply."""
    if not stopped:
        return "length"
    at_limit = episode.num_turns >= max_turns
    if not (at_limit or env.is_completed(episode.messages, episode.state)):
        return None
    if not at_limit or env.is_done(episode.messages, episode.state):  # the env, not the limit, ends it
        return "completed"
    return "max_turns"


def _fail(episode: _Episode, index: int, error: BaseException, where: str):
    episode.state["env_error"] = f"{where}: {type(error).__name__}: {error}"
    episode.finish("env_error")
    logger.warning("rollout: episode %d (row %d) ended by an error in %s: %r",
                   index, episode.row_index, where, error)


def rollout(env: Environment, rows: Sequence[Row], tokenizer: Tokenizer, sampler: "Sampler | EngineSampler", key,
            config: RolloutConfig | Mapping[str, Any], *, episode_offset: int = 0) -> Rollout:
    """Plays `config.group_size` episodes of `env` for each of `rows` (see the module docstring).

    Args:
      env: an `Environment` (its `initial_state`, `is_completed`, `env_response` drive the turns).
      rows: dataset rows; row i's episodes are `i * group_size ... (i + 1) * group_size - 1`.
      tokenizer: a `grpo_jax.tokenizer.Tokenizer` with a chat template.
      sampler: `model_sampler(model, sampling_config, engine_config)`: an `EngineSampler` (each
        episode on its own: continuous batching, its cache kept across turns, tools concurrent
        with decoding) or, without `engine_config`, a lockstep `Sampler` (one batched call per
        turn for every live episode). Both are given each episode's global id and draw the same
        numbers for it.
      key: a `jax.random` key; turn k samples with `fold_in(key, k)`.
      config: a `RolloutConfig` (or a mapping of its fields).
      episode_offset: global id of this call's first episode: episode k (row k // group_size)
        has id `episode_offset + k`. A process rolling out its block of a batch passes the
        block's first episode, so its episodes draw what one process rolling out the whole
        batch would draw for them.

    Returns:
      A `Rollout`: padded token arrays, masks, log-probs, the episodes' messages, states, finish
      reasons and the rollout metrics.
    """
    config = RolloutConfig.from_any(config)
    if isinstance(env, AgentEnv):  # the user's agent code drives its episodes (grpo_jax.agent_rollout)
        from grpo_jax import agent_rollout  # imported on use: the web stack loads only for agent envs
        return agent_rollout.play(env, rows, tokenizer, sampler, key, config, episode_offset=episode_offset)
    rows = list(rows)
    if not rows:
        raise ValueError("rollout needs at least one row")
    if config.check_template:
        check_template(tokenizer, env, rows[0])
    end_of_turn = tuple(tokenizer.end_of_turn_ids)
    _check_sampler(sampler, config, end_of_turn)
    turns = _Turns(env, tokenizer, config, end_of_turn)
    start = time.perf_counter()
    episodes, prompt_ids, first_rows = turns.start(rows)
    if isinstance(sampler, EngineSampler):
        run_sync(lambda: _play_on_engine(turns, sampler.engine, sampler.params, episodes, prompt_ids, first_rows, key,
                                         episode_offset))
    else:
        _play_lockstep(turns, sampler, episodes, prompt_ids, first_rows, key, episode_offset)
    turns.timing["total_s"] = time.perf_counter() - start
    pad_id = tokenizer.pad_id if config.pad_id is None else config.pad_id
    return pack_episodes(
        [dict(tokens=e.tokens, mask=e.mask, logprobs=e.logprobs, prompt=e.prompt,
              completion=e.messages[len(e.prompt):], state=e.state, finish_reason=e.finish_reason,
              num_turns=e.num_turns) for e in episodes],
        group_size=config.group_size, pad_id=pad_id, length_multiple=config.length_multiple,
        max_seq_len=config.max_seq_len, mask_truncated=config.mask_truncated,
        mask_env_errors=config.mask_env_errors, timing=turns.timing)


def _play_lockstep(turns: "_Turns", sampler: Sampler, episodes, prompt_ids, first_rows, key, episode_offset):
    """Every live episode's turn in ONE sampler call, then every env reply, turn after turn."""
    group, turn = turns.config.group_size, 0
    index_of = {id(e): k for k, e in enumerate(episodes)}
    live = [e for i in first_rows for e in episodes[i * group:(i + 1) * group]]
    while live:
        if turn == 0:
            prompts, n = [prompt_ids[i] for i in first_rows], group
        else:
            prompts, n = [e.tokens for e in live], 1
        row_ids = [episode_offset + index_of[id(e)] for e in live]
        samples = turns.sample(sampler, prompts, jax.random.fold_in(key, turn), n, row_ids)
        waiting = []
        for row, e in enumerate(live):
            stopped = int(samples.stop_reason[row]) == STOP_TOKEN
            n_row = int(samples.lengths[row])
            if turns.after_turn(e, index_of[id(e)], samples.tokens[row, :n_row], samples.logprobs[row, :n_row],
                                stopped):
                waiting.append(e)
        t0 = time.perf_counter()
        replies = []
        if waiting:
            replies = run_sync(lambda: respond_all(turns.env, [list(e.messages) for e in waiting],
                                                   [e.state for e in waiting], return_exceptions=True))
        turns.timing["env_s"] += time.perf_counter() - t0
        live = [e for e, result in zip(waiting, replies) if turns.take_reply(e, index_of[id(e)], result) is not None]
        turn += 1


async def _play_on_engine(turns: "_Turns", engine: Engine, params: GenerationParams, episodes, prompt_ids,
                          first_rows, key, episode_offset):
    """Each episode its own coroutine on the engine: a turn, the env's reply (awaited while the
    other episodes decode), the reply's tokens prefilled onto its kept cache, the next turn."""
    group = turns.config.group_size
    stats_before = dict(engine.stats)

    async def play(index: int, e: _Episode, session):
        new_ids: list[int] = []
        try:
            while True:
                out = await engine.generate(session, new_ids, params)
                if not turns.after_turn(e, index, out.tokens, out.logprobs, out.finish_reason == "stop"):
                    return
                t0 = time.perf_counter()
                try:
                    result = await turns.env.env_response(list(e.messages), e.state)
                except Exception as error:  # the episode's own failure: it ends, the others go on
                    result = error
                turns.timing["env_s"] += time.perf_counter() - t0
                new_ids = turns.take_reply(e, index, result)
                if new_ids is None:
                    return
        finally:
            engine.release(session)

    plays = []
    for i in first_rows:
        ids = [episode_offset + k for k in range(i * group, (i + 1) * group)]
        for k, session in zip(range(i * group, (i + 1) * group), engine.open(prompt_ids[i], ids, key)):
            plays.append(play(k, episodes[k], session))
    await asyncio.gather(*plays)
    delta = {k: v - stats_before.get(k, 0) for k, v in engine.stats.items()}
    turns.timing["sampler_s"] += delta.get("busy_s", 0.0)
    turns.timing["sampler_calls"] += delta.get("decode_calls", 0) + delta.get("prefill_calls", 0)
    turns.timing["slot_use"] = delta.get("sampled_tokens", 0) / max(delta.get("slot_steps", 0), 1)


class _Turns:
    """The per-episode steps of a rollout (both modes), with the budget and timings they share."""

    def __init__(self, env: Environment, tokenizer: Tokenizer, config: RolloutConfig, end_of_turn):
        self.env, self.tokenizer, self.config, self.end_of_turn = env, tokenizer, config, end_of_turn
        self.max_turns = min(env.max_turns, config.max_turns or env.max_turns)
        self.tools = env_tool_schemas(env)  # rendered by the chat template in every encoding
        # A turn needs room for its prompt, max_new_tokens and (if cut) the end-of-turn ids.
        self.room_for_turn = config.max_new_tokens + len(end_of_turn)
        self.timing = dict(sampler_s=0.0, env_s=0.0, total_s=0.0, sampler_calls=0)

    def fits(self, length: int) -> bool:
        return length + self.room_for_turn <= self.config.max_seq_len

    def start(self, rows):
        """Every row's `group_size` episodes (row-major), each row's prompt ids, and the rows
        whose prompt leaves room for a turn (the others end at once: "sequence_budget")."""
        episodes, prompt_ids, group = [], [], self.config.group_size
        for i, row in enumerate(rows):
            for j in range(group):
                prompt, state = self.env.initial_state(row)
                if j == 0:
                    prompt_ids.append(self.tokenizer.encode_chat(prompt, add_generation_prompt=True,
                                                                    tools=self.tools))
                state["completion_tokens"] = 0
                ids = prompt_ids[i]
                episodes.append(_Episode(i, list(prompt), state, list(ids), [0] * len(ids), [0.0] * len(ids),
                                         list(prompt)))
        first_rows = [i for i in range(len(rows)) if self.fits(len(prompt_ids[i]))]
        for i in sorted(set(range(len(rows))) - set(first_rows)):
            for e in episodes[i * group:(i + 1) * group]:
                e.finish("sequence_budget")
        return episodes, prompt_ids, first_rows

    def sample(self, sampler: Sampler, prompts, key, n: int, row_ids) -> Samples:
        """ONE sampler call for every live episode (n per prompt), timed and checked."""
        t0 = time.perf_counter()
        samples = sampler([list(p) for p in prompts], key, n, row_ids)
        self.timing["sampler_s"] += time.perf_counter() - t0
        self.timing["sampler_calls"] += 1
        if len(samples.lengths) != len(row_ids):
            raise ValueError(f"the sampler returned {len(samples.lengths)} rows for {len(prompts)} "
                             f"prompts x n={n}")
        return samples

    def after_turn(self, e: _Episode, index: int, ids, logprobs, stopped: bool) -> bool:
        """Appends the episode's sampled turn; True when the env should reply (else it ended)."""
        _add_turn(e, ids, logprobs, stopped, self.tokenizer, self.end_of_turn, self.config.max_new_tokens)
        try:
            reason = _reason_after_turn(self.env, e, stopped, self.max_turns)
        except Exception as error:
            _fail(e, index, error, "is_completed")
            return False
        if reason is None and not self.fits(len(e.tokens) + 1):  # no room even for a 1-token reply
            reason = "sequence_budget"
        if reason is not None:
            e.finish(reason)
        return reason is None

    def take_reply(self, e: _Episode, index: int, result) -> list[int] | None:
        """Appends the env's reply (`(messages, state)`, or the exception it raised) as env
        tokens; returns its ids, or None when the episode ended (an error, no room)."""
        if isinstance(result, BaseException):
            _fail(e, index, result, "env_response")
            return None
        try:
            reply, e.state = [dict(m) for m in result[0]], result[1]
            suffix = self.tokenizer.encode_turn_suffix(reply, add_generation_prompt=True, tools=self.tools)
        except Exception as error:  # a malformed reply, or one the template cannot render
            _fail(e, index, error, "tokenizing the env reply")
            return None
        if not self.fits(len(e.tokens) + len(suffix)):
            e.finish("sequence_budget")
            return None
        e.extend(suffix, 0)
        e.messages.extend(reply)
        return list(suffix)
