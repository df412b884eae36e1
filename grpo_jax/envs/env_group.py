"""`EnvGroup`: several environments behind one, for multi-task data.

Rows carry their task name in "task"; `initial_state` stores it in the state, and every
per-episode call (`env_response`, `is_completed`, `is_done`, `gold_completion`) goes to that task's
env.  Scoring groups the episodes by task and scores each group with its own env's
rubric; per-function scores and metrics are keyed "<task>/<function>" (NaN for episodes
of other tasks, which are not failures), and "reward/<task>" is each task's mean reward.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from grpo_jax.envs.base import Environment, Message, Row, State
from grpo_jax.rubrics.rubric import RubricScores, score_metrics


class GroupRubric:
    """Scores each episode with the rubric of its task's env (`tasks[i]`)."""

    parser = None

    def __init__(self, envs: Mapping[str, Environment]):
        self.envs = envs

    @property
    def names(self) -> list[str]:
        return [f"{task}/{name}" for task, env in self.envs.items() for name in env.rubric.names]

    @property
    def token_funcs(self) -> list:
        """Token functions of all tasks' rubrics (each applies only to its own task's episodes)."""
        return [tf for env in self.envs.values() for tf in getattr(env.rubric, "token_funcs", [])]

    def token_rewards(self, tokens_BT, mask_BT):
        raise NotImplementedError("token rewards differ per task in a group: pass tokens_BT and mask_BT "
                                  "to score(), which applies each task's token functions to its episodes")

    def score(self, prompts, completions, answers=None, states=None, infos=None, tasks=None, *,
              tokens_BT=None, mask_BT=None) -> RubricScores:
        n = len(completions)
        if tasks is None:
            raise ValueError("a group rubric needs the task of each episode")

        def column(values, default):
            return [default() for _ in range(n)] if values is None else list(values)

        prompts, answers = column(prompts, list), column(answers, lambda: None)
        states, infos = column(states, dict), column(infos, dict)
        unknown = set(tasks) - set(self.envs)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {sorted(self.envs)}")
        rewards = np.full(n, np.nan)
        scores: dict[str, np.ndarray] = {}
        failures: dict[str, int] = {}
        errors: dict[str, str] = {}
        for task, env in self.envs.items():
            index = [i for i, t in enumerate(tasks) if t == task]
            if not index:
                continue
            pick = lambda values: [values[i] for i in index]  # noqa: E731
            sub = env.rubric.score(pick(prompts), pick(completions), pick(answers), pick(states), pick(infos),
                                   pick(tasks),
                                   tokens_BT=None if tokens_BT is None else tokens_BT[np.asarray(index)],
                                   mask_BT=None if mask_BT is None else mask_BT[np.asarray(index)])
            rewards[index] = sub.rewards
            for name, values in sub.scores.items():
                key = f"{task}/{name}"
                scores[key] = np.full(n, np.nan)
                scores[key][index] = values
                failures[key] = sub.failures[name]
            errors.update({f"{task}/{k}": v for k, v in sub.errors.items()})
        return RubricScores(rewards, scores, failures, errors, score_metrics(rewards, scores, failures, tasks))


class EnvGroup(Environment):
    """Dispatches rows and episodes to the env of their task.

    Args:
      envs: environments (keyed by their `name`) or a {task name: env} mapping.
      proportions: share of each task in `dataset` rows (default: equal).
    """
    name = "group"

    def __init__(self, envs: Sequence[Environment] | Mapping[str, Environment], *,
                 proportions: Mapping[str, float] | None = None):
        envs = dict(envs) if isinstance(envs, Mapping) else {env.name: env for env in envs}
        if len(envs) == 0:
            raise ValueError("an env group needs at least one env")
        super().__init__(rubric=None, max_turns=max(env.max_turns for env in envs.values()))
        self.envs = envs
        self.rubric = GroupRubric(envs)
        total = sum((proportions or {t: 1.0 for t in envs}).values())
        self.proportions = {t: (proportions or {}).get(t, 0.0 if proportions else 1.0) / total for t in envs}

    def env_for(self, task: str) -> Environment:
        if task not in self.envs:
            raise KeyError(f"unknown task {task!r}; known: {sorted(self.envs)}")
        return self.envs[task]

    def dataset(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """Rows of all tasks (each labelled with its task), shuffled together by `seed`."""
        rows = []
        tasks = list(self.envs)
        for k, task in enumerate(tasks):
            count = None if n is None else (n - sum(round(n * self.proportions[t]) for t in tasks[:-1])
                                            if k == len(tasks) - 1 else round(n * self.proportions[task]))
            if count == 0:
                continue
            rows += [{**row, "task": task} for row in self.envs[task].dataset(split, count, seed)]
        order = np.random.default_rng(seed).permutation(len(rows))
        return [rows[i] for i in order]

    def initial_state(self, row: Row) -> tuple[list[Message], State]:
        prompt, state = self.env_for(row["task"]).initial_state(row)
        state["task"] = row["task"]
        return prompt, state

    def is_done(self, messages, state: State) -> bool:
        return self.env_for(state["task"]).is_done(messages, state)

    def tool_schemas(self):
        """The tasks' native tool schemas, when they agree: one rollout renders every prompt of
        a batch with one `tools=` list (tasks with different native tools cannot share a group)."""
        found = [schemas for schemas in (env.tool_schemas() for env in self.envs.values()) if schemas]
        if any(schemas != found[0] for schemas in found[1:]):
            raise ValueError(f"the tasks of this group have different native tools: "
                             f"{[n for n, e in self.envs.items() if e.tool_schemas()]}; a group shares one tool list")
        return found[0] if found else None

    def is_completed(self, messages, state: State) -> bool:
        return self.env_for(state["task"]).is_completed(messages, state)

    async def env_response(self, messages, state: State):
        return await self.env_for(state["task"]).env_response(messages, state)

    def gold_completion(self, row: Row) -> list[Message]:
        return self.env_for(row["task"]).gold_completion(row)
