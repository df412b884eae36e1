"""The `Environment` protocol, `SingleTurnEnv`, `MultiTurnEnv`, and episode helpers.

Data
  Message:  {"role": "system" | "user" | "assistant" | "tool", "content": str}.
  Row:      a dataset row, a dict with "question" (str) or "prompt" (list of messages),
            "answer" (gold answer, str), "info" (dict, task specific) and "task" (str).
  Prompt:   the messages before the model's first turn.
  Completion: every message after the prompt: assistant turns and environment replies.
  State:    a per-episode dict.  All per-episode data lives here, never on the env object,
            so one env serves many concurrent episodes.  `initial_state` sets
              "task", "answer", "info", "prompt_length" (number of prompt messages),
              "truncated" (False; the rollout sets True when generation hit its token limit),
            environments add their own keys (`ToolEnv`: "tool_calls", "tool_errors",
            "tool_timeouts", "tool_log"), and the rollout may add "completion_tokens"
            (model tokens in the episode, read by the overlong penalty).

Driving an episode (what the rollout loop does, batched over many episodes)
    prompt, state = env.initial_state(row)
    messages = list(prompt)
    while True:
        messages.append({"role": "assistant", "content": <one sampler call>})
        if env.is_completed(messages, state):            # sync, cheap
            break
        reply, state = await env.env_response(messages, state)   # async; tools run here
        messages.extend(reply)
    completion = messages[state["prompt_length"]:]
  `env_response` is a coroutine so that the replies of all live episodes can be gathered
  concurrently (`respond_all`); `env_response_sync` wraps it for sync callers.  It may
  update `state` in place and returns it.  `is_completed` is true once the episode was
  truncated, has `max_turns` assistant turns, or the env says it is done (`is_done`).

Per-turn rewards (for turn-level credit, `c.grpo.credit = "turn"`, `grpo_jax.credit`)
  An env rewards an assistant turn with `record_turn_reward(state, reward, messages=messages)`
  from `env_response` (the turn it answers: the latest assistant turn of `messages`), or with
  `turn=k` for turn k (0-based).  It lands in `state["turn_rewards"]`, a list indexed by assistant
  turn (turns without one hold 0.0; rewards of the same turn add up; they must be finite).
  `env_response` runs after every assistant turn but the last, so the last turn's reward is the
  rubric's episode (terminal) reward, which credit adds at the episode's last turn: an env
  should not count a turn's reward both there and in the rubric.  `turn_rewards_from_states`
  gathers them into an [N, K] array (0 where missing).

Scoring
  `env.score(prompts, completions, states)` -> `RubricScores` (rewards [N], NaN on failure,
  per-function scores and metrics), reading answer / info / task from the states.
  `rubrics.check_rewards(scores.rewards, scores.metrics)` raises when all of them are NaN.
  `env.audit(rows)` scores the rubric on known reward hacks (`rubrics.audit_rubric`), with the
  env's gold demonstrations as the control.

Episode helpers for tests, evaluation and the warm start: `run_episode(s)` with a policy
function (messages -> text, sync or async), `replay_episodes` (scripted assistant turns,
e.g. `env.gold_completion(row)`, with the env's replies recomputed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
from typing import Any, Awaitable, Callable, Mapping, Sequence

import numpy as np

from grpo_jax.rubrics.audit import DEFAULT_HACKS, AuditReport, Hack, audit_rubric
from grpo_jax.rubrics.rubric import Rubric, RubricScores
from grpo_jax.utils import run_sync

Message = dict[str, str]
Row = Mapping[str, Any]
State = dict[str, Any]
Policy = Callable[[list[Message]], "str | Awaitable[str]"]


@dataclasses.dataclass
class Episode:
    """A finished (or cut) episode: prompt messages, completion messages, final state."""
    prompt: list[Message]
    completion: list[Message]
    state: State

    @property
    def messages(self) -> list[Message]:
        return self.prompt + self.completion


class Environment:
    """Base class and protocol of all environments (see the module docstring).

    Args:
      name: task name, stored in each row's "task" and each state's "task".
      rubric: scores finished episodes.
      parser: the answer parser of the task (used by rubrics and demonstrations).
      system_prompt: prepended as a system message to question rows.
      max_turns: most assistant turns in an episode.
      dataset_fn: `(split, n, seed) -> rows`, for envs not defining `dataset` themselves.
      reward_timeout_s, reward_isolation: override the rubric's time limit per reward call and
        its isolation ("process" / "thread", see `grpo_jax.rubrics.rubric`); None keeps the
        rubric's.  Reachable from a config as `env.kwargs.reward_timeout_s` etc.
    """

    name: str = "env"
    max_turns: int = 1

    def __init__(self, *, name: str | None = None, rubric: Rubric | None = None, parser: Any = None,
                 system_prompt: str | None = None, max_turns: int | None = None,
                 dataset_fn: Callable[[str, int | None, int], Sequence[Row]] | None = None,
                 reward_timeout_s: float | None = None, reward_isolation: str | None = None):
        self.name = name or self.name
        self.rubric = rubric if rubric is not None else Rubric()
        if reward_timeout_s is not None or reward_isolation is not None:
            self.rubric = self.rubric.configured(timeout_s=reward_timeout_s, isolation=reward_isolation)
        self.parser = parser
        self.system_prompt = system_prompt
        self.max_turns = self.max_turns if max_turns is None else int(max_turns)
        self._dataset_fn = dataset_fn

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, max_turns={self.max_turns}, rubric={self.rubric})"

    # -- data -------------------------------------------------------------------------------
    def dataset(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """Rows of a split; `n` rows (all when None), deterministic for a given `seed`."""
        if self._dataset_fn is None:
            raise NotImplementedError(f"{type(self).__name__} has no dataset; pass dataset_fn")
        return [self._with_task(row) for row in self._dataset_fn(split, n, seed)]

    def replace_dataset(self, dataset_fn: Callable[[str, int | None, int], Sequence[Row]]) -> "Environment":
        """Serve the rows of `dataset_fn` instead of the env's own (e.g. `env.dataset` of a config,
        for envs that define `dataset` themselves too); returns self."""
        self._dataset_fn = dataset_fn
        self.dataset = lambda split="train", n=None, seed=0: [
            self._with_task(row) for row in dataset_fn(split, n, seed)]
        return self

    def _with_task(self, row: Row) -> dict[str, Any]:
        row = dict(row)
        row.setdefault("task", self.name)
        row.setdefault("info", {})
        return row

    def make_prompt(self, row: Row) -> list[Message]:
        """`row["prompt"]` if present, else [system prompt] + the question as a user message."""
        if row.get("prompt"):
            return [dict(m) for m in row["prompt"]]
        prompt = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return prompt + [{"role": "user", "content": str(row["question"])}]

    def initial_state(self, row: Row) -> tuple[list[Message], State]:
        """(prompt messages, fresh state) for a row."""
        prompt = self.make_prompt(row)
        state = {"task": row.get("task", self.name), "answer": row.get("answer"),
                 "info": dict(row.get("info") or {}), "prompt_length": len(prompt), "truncated": False}
        state.update(self.setup_state(row))
        return prompt, state

    def setup_state(self, row: Row) -> State:
        """Extra initial state keys of an environment (hook)."""
        return {}

    # -- turns ------------------------------------------------------------------------------
    @staticmethod
    def completion_of(messages: Sequence[Message], state: State) -> list[Message]:
        return list(messages[state["prompt_length"]:])

    def num_turns(self, messages: Sequence[Message], state: State) -> int:
        """Assistant turns so far in the episode."""
        return sum(m["role"] == "assistant" for m in self.completion_of(messages, state))

    def is_done(self, messages: Sequence[Message], state: State) -> bool:
        """Whether the env itself ends the episode after the last assistant turn, as opposed to
        the turn limit or truncation (hook; a group asks the episode's task env)."""
        return False

    def tool_schemas(self) -> list[dict[str, Any]] | None:
        """The OpenAI function schemas of the env's native tools, for the chat template's
        `tools=` (hook; `ToolEnv` with `native_tools`); None: no native tools."""
        return None

    def is_completed(self, messages: Sequence[Message], state: State) -> bool:
        return (bool(state.get("truncated")) or self.num_turns(messages, state) >= self.max_turns
                or self.is_done(messages, state))

    async def env_response(self, messages: Sequence[Message], state: State) -> tuple[list[Message], State]:
        """The environment's reply messages to the last assistant turn, and the state."""
        raise NotImplementedError(f"{type(self).__name__} does not reply")

    def env_response_sync(self, messages: Sequence[Message], state: State) -> tuple[list[Message], State]:
        return run_sync(lambda: self.env_response(messages, state))

    # -- demonstrations and scoring ------------------------------------------------------------
    def gold_completion(self, row: Row) -> list[Message]:
        """A correct demonstration episode for `row` (assistant turns and env replies)."""
        raise NotImplementedError(f"{type(self).__name__} has no gold demonstrations")

    def score(self, prompts: Sequence[list[Message]], completions: Sequence[list[Message]],
              states: Sequence[State], *, tokens_BT=None, mask_BT=None) -> RubricScores:
        """Rubric scores of N finished episodes (answer, info and task read from the states)."""
        return self.rubric.score(prompts, completions, [s.get("answer") for s in states], states,
                                 [s.get("info", {}) for s in states], [s.get("task") for s in states],
                                 tokens_BT=tokens_BT, mask_BT=mask_BT)

    def score_episodes(self, episodes: Sequence[Episode], **kwargs) -> RubricScores:
        return self.score([e.prompt for e in episodes], [e.completion for e in episodes],
                          [e.state for e in episodes], **kwargs)

    def audit(self, rows: Sequence[Row], *, threshold: float = 0.5,
              hacks: Sequence[Hack] = DEFAULT_HACKS) -> AuditReport:
        """`rubrics.audit_rubric` of this env's rubric: the hacks start from the env's prompts and
        initial states, and its gold demonstrations, replayed, are the control (when it has them)."""
        rows = list(rows)
        try:
            completions = [self.gold_completion(row) for row in rows]
        except NotImplementedError:
            gold = None
        else:
            gold = replay_episodes(self, rows, completions)
        return audit_rubric(self.rubric, rows, threshold=threshold, hacks=hacks,
                            starts=[self.initial_state(row) for row in rows], gold=gold)


class SingleTurnEnv(Environment):
    """One assistant turn, no environment reply (question -> answer tasks)."""
    max_turns = 1

    def __init__(self, **kwargs):
        if kwargs.get("max_turns") not in (None, 1):
            raise ValueError("a single-turn env has max_turns = 1")
        super().__init__(**kwargs)

    def is_done(self, messages, state) -> bool:
        return True

    def is_completed(self, messages, state) -> bool:
        return True

    def gold_completion(self, row: Row) -> list[Message]:
        """The row's answer in the parser's format (tasks with worked solutions override this)."""
        if self.parser is None or row.get("answer") is None:
            raise NotImplementedError(f"{type(self).__name__} has no gold demonstrations without a parser "
                                      "and answers")
        return [{"role": "assistant", "content": self.parser.format(answer=str(row["answer"]))}]


class MultiTurnEnv(Environment):
    """Several turns: subclasses implement `async env_response` and usually `is_done`."""
    max_turns = 4


# -- driving episodes --------------------------------------------------------------------------
async def _policy_text(policy: Policy, messages: list[Message]) -> str:
    text = policy(messages)
    return await text if inspect.isawaitable(text) else text


async def run_episode(env: Environment, row: Row, policy: Policy) -> Episode:
    """Play one episode of `env` on `row` with `policy(messages) -> assistant text`."""
    prompt, state = env.initial_state(row)
    messages = list(prompt)
    while True:
        messages.append({"role": "assistant", "content": await _policy_text(policy, messages)})
        if env.is_completed(messages, state):
            break
        reply, state = await env.env_response(messages, state)
        messages.extend(reply)
    return Episode(prompt, messages[len(prompt):], state)


def run_episodes(env: Environment, rows: Sequence[Row], policy: Policy) -> list[Episode]:
    """`run_episode` for all rows concurrently (env replies of different episodes overlap)."""
    async def play_all():
        return await asyncio.gather(*(run_episode(env, row, policy) for row in rows))
    return list(run_sync(play_all))


def replay_episodes(env: Environment, rows: Sequence[Row],
                    completions: Sequence[Sequence[Message]]) -> list[Episode]:
    """Play each row with the assistant turns of the matching scripted completion.

    The env's replies are recomputed (tools really run), so the returned states are the
    ones a policy writing exactly these turns would get.  A script that runs out of
    assistant turns continues with empty messages.
    """
    async def play(row, completion):
        turns = iter([m["content"] for m in completion if m["role"] == "assistant"])
        return await run_episode(env, row, lambda messages: next(turns, ""))

    async def play_all():
        return await asyncio.gather(*(play(r, c) for r, c in zip(rows, completions)))
    return list(run_sync(play_all))


async def respond_all(env: Environment, batch_messages: Sequence[Sequence[Message]],
                      states: Sequence[State], *, return_exceptions: bool = False) -> list[Any]:
    """`env.env_response` for many live episodes at once (their tools run concurrently): each
    episode's (reply, state). With `return_exceptions`, an episode whose reply raised gets the
    exception in its place and the others carry on (the rollout's way)."""
    return list(await asyncio.gather(*(env.env_response(m, s) for m, s in zip(batch_messages, states)),
                                     return_exceptions=return_exceptions))


# -- per-turn rewards (module docstring) ------------------------------------------------------
TURN_REWARDS_KEY = "turn_rewards"


def record_turn_reward(state: State, reward: float, turn: int | None = None, *,
                       messages: Sequence[Message] | None = None) -> State:
    """Adds `reward` to assistant turn `turn`'s entry of `state["turn_rewards"]` (0-based; the
    list grows with 0.0 up to it); `turn=None` takes the latest assistant turn of `messages` (what
    `env_response` was given).  Returns `state`."""
    if turn is None:
        if messages is None:
            raise ValueError("record_turn_reward needs the turn: pass turn=k or messages=<the messages "
                             "env_response got> (their latest assistant turn)")
        turn = sum(m["role"] == "assistant" for m in messages[state["prompt_length"]:]) - 1
    turn, reward = int(turn), float(reward)
    if turn < 0:
        raise ValueError(f"record_turn_reward: turn must be >= 0, got {turn} (no assistant turn yet?)")
    if not math.isfinite(reward):
        raise ValueError(f"record_turn_reward: the reward of turn {turn} is {reward}, not finite")
    rewards = state.setdefault(TURN_REWARDS_KEY, [])
    rewards.extend([0.0] * (turn + 1 - len(rewards)))
    rewards[turn] += reward
    return state


def turn_rewards_from_states(states: Sequence[State], num_turns, max_turns: int) -> np.ndarray:
    """`[N, K]` float64 (K = `max_turns`): episode i's `state["turn_rewards"][k]`, 0 where missing.
    Raises when an env rewarded a turn its episode does not have (k >= num_turns[i])."""
    num_turns = np.asarray(num_turns, np.int64)
    if num_turns.shape != (len(states),):
        raise ValueError(f"num_turns must be [N] = ({len(states)},), got {num_turns.shape}")
    out = np.zeros((len(states), max_turns), np.float64)
    for i, state in enumerate(states):
        rewards = [float(r) for r in state.get(TURN_REWARDS_KEY) or ()]
        extra = [k for k, r in enumerate(rewards) if k >= num_turns[i] and r != 0.0]
        if extra:
            raise ValueError(f"episode {i} has {num_turns[i]} turns but a reward for turn {extra[0]}")
        kept = rewards[:min(len(rewards), max_turns)]
        out[i, :len(kept)] = kept
    return out
