"""Reverse words: an example plug-in environment, outside `grpo_jax/`.

    python experiments/train.py --config examples/reverse_words_tiny.py --workdir /tmp/reverse_words
    (with the repository root on PYTHONPATH; the config sets
     env.name = "examples.reverse_words_env:load_environment")

Task: "reverse: sun cat red" -> "<answer>red cat sun</answer>". Words come from a 12-word
vocabulary, 2-4 of them, so a tiny model can learn it. Reward: exact_match 1.0 (the answer's
words are the question's reversed) + strict_format 0.2.

It follows the plug-in convention `load_environment(**kwargs) -> Environment`: the function
builds an env from the library's pieces (`SingleTurnEnv`, a parser, a `Rubric`).
"""

from __future__ import annotations

import numpy as np

from grpo_jax.envs import SingleTurnEnv
from grpo_jax.rubrics import Rubric, answer_parser, format_reward

WORDS = ("sun", "cat", "red", "dog", "sky", "hat", "map", "pen", "box", "cup", "owl", "fig")


def exact_match(parsed_answer, answer) -> float:
    """1.0 when the answer's words equal the gold words (spacing ignored)."""
    return float(parsed_answer is not None and parsed_answer.split() == str(answer).split())


def make_rows(split: str, n: int | None, seed: int, *, min_words: int = 2, max_words: int = 4):
    """`n` (default 1000) rows; train and test from different streams of one seed."""
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split]])
    rows = []
    for _ in range(1000 if n is None else n):
        words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(min_words, max_words + 1)))]
        rows.append({"question": "reverse: " + " ".join(words), "answer": " ".join(reversed(words))})
    return rows


def load_environment(min_words: int = 2, max_words: int = 4, system_prompt: str | None = None,
                     **kwargs) -> SingleTurnEnv:
    """The reverse-words env; `kwargs` go to `SingleTurnEnv` (e.g. reward_timeout_s)."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    parser = answer_parser()
    rubric = Rubric([exact_match, format_reward(parser)], [1.0, 0.2], parser=parser)
    return SingleTurnEnv(
        name="reverse_words", parser=parser, rubric=rubric, system_prompt=system_prompt,
        dataset_fn=lambda split, n, seed: make_rows(split, n, seed, min_words=min_words, max_words=max_words),
        **kwargs)
