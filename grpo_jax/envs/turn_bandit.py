"""TurnBandit: a multi-turn bandit whose per-turn credit is known (turn-level credit, `grpo_jax.credit`).

Each assistant turn picks an arm by writing its name ("a", "b", ... or "stop"). A row's
`info["rewards"]` holds one table per turn, `{arm: reward}`: turn k's pick `c` earns
`rewards[k].get(c, 0.0)` (an unknown word earns 0). "stop" ends the episode, as does the last
table; so the policy decides how many turns an episode has. Turns before the last get their
reward from `env_response` (`record_turn_reward`), the last turn from the rubric (`arm_reward`,
the episode's terminal reward), the per-turn reward convention of `grpo_jax.envs.base`.

The value of every pick is known: with a policy `pi_k` per turn, `Q_k(c) = r_k(c) + gamma
V_{k+1}` (no continuation after "stop" or the last turn) and `V_k = sum_c pi_k(c) Q_k(c)`;
`best_picks` gives the optimal episode (the gold demonstration).

    env = make_env("turn_bandit")                 # or TurnBanditEnv(max_turns=3, arms=("a", "b", "c"))
    rows = env.dataset("train", n=8, seed=0)       # random tables, or rows of your own:
    row = {"question": "pick", "info": {"rewards": [{"a": 1.0, "b": 0.0, "stop": 0.5}, {"a": 0.0, "b": 2.0}]}}
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from grpo_jax.envs.base import Message, MultiTurnEnv, Row, State, record_turn_reward
from grpo_jax.rubrics.rubric import Rubric

STOP = "stop"


def parse_pick(text: str) -> str:
    """The arm a turn names: its first word, lower-cased, without punctuation ("" if none)."""
    words = str(text).strip().lower().split()
    return words[0].strip(".,;:!?\"'`()[]<>") if words else ""


def picks_of(completion: Sequence[Message]) -> list[str]:
    return [parse_pick(m["content"]) for m in completion if m["role"] == "assistant"]


def arm_reward(completion, info) -> float:
    """The terminal reward: the last turn's pick in that turn's table."""
    picks, tables = picks_of(completion), info["rewards"]
    if not picks or len(picks) > len(tables):
        return 0.0
    return float(tables[len(picks) - 1].get(picks[-1], 0.0))


def best_picks(tables: Sequence[Mapping[str, float]], discount: float = 1.0) -> list[str]:
    """The picks of an optimal episode (backward induction over the tables; ties: first arm)."""
    value, best = 0.0, []
    for k in range(len(tables) - 1, -1, -1):
        last = k == len(tables) - 1
        q = {arm: r + (0.0 if last or arm == STOP else discount * value) for arm, r in tables[k].items()}
        arm = max(q, key=q.get)
        value, best = q[arm], [arm] + ([] if last or arm == STOP else best)
    return best


class TurnBanditEnv(MultiTurnEnv):
    """Pick an arm per turn; per-turn rewards from `info["rewards"]` (module docstring).

    Args:
      arms: the arms of generated rows ("stop" is added on every turn but the last).
      max_turns: turns of generated rows (and the env's turn limit).
      **kwargs: of `Environment`.
    """
    name = "turn_bandit"
    max_turns = 2

    def __init__(self, arms: Sequence[str] = ("a", "b"), **kwargs):
        kwargs.setdefault("rubric", Rubric([arm_reward], isolation="thread"))
        kwargs.setdefault("system_prompt", "Each turn, answer with one word: the arm you pick.")
        super().__init__(**kwargs)
        self.arms = tuple(arms)

    def dataset(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """`n` rows (64 when None) of random integer tables in 0..3, "stop" worth 0..3 too."""
        rng = np.random.default_rng([seed, {"train": 0, "test": 1}.get(split, 2)])
        rows = []
        for _ in range(64 if n is None else n):
            tables = []
            for k in range(self.max_turns):
                arms = self.arms + ((STOP,) if k < self.max_turns - 1 else ())
                tables.append({arm: float(rng.integers(0, 4)) for arm in arms})
            rows.append(self._row(tables))
        return rows

    def _row(self, tables: list[dict[str, float]]) -> dict[str, Any]:
        arms = ", ".join(tables[0])
        return {"question": f"Pick one of: {arms}.", "answer": " ".join(best_picks(tables)),
                "info": {"rewards": tables}, "task": self.name}

    def is_done(self, messages, state) -> bool:
        picks = picks_of(self.completion_of(messages, state))
        return bool(picks) and (picks[-1] == STOP or len(picks) >= len(state["info"]["rewards"]))

    async def env_response(self, messages, state: State) -> tuple[list[Message], State]:
        picks = picks_of(self.completion_of(messages, state))
        turn = len(picks) - 1
        reward = float(state["info"]["rewards"][turn].get(picks[-1], 0.0))
        record_turn_reward(state, reward, messages=messages)
        arms = ", ".join(state["info"]["rewards"][turn + 1])
        return [{"role": "user", "content": f"Reward {reward:g}. Pick one of: {arms}."}], state

    def gold_completion(self, row: Row) -> list[Message]:
        """The optimal picks (`best_picks`), the env's replies between them."""
        picks, tables, out = best_picks(row["info"]["rewards"]), row["info"]["rewards"], []
        for k, pick in enumerate(picks):
            out.append({"role": "assistant", "content": pick})
            if k < len(picks) - 1:
                reward = float(tables[k].get(pick, 0.0))
                out.append({"role": "user", "content": f"Reward {reward:g}. Pick one of: {', '.join(tables[k + 1])}."})
        return out
