"""Judge-proposed criteria for the rubric tuner: a judge model (any OpenAI-compatible endpoint,
through the `openai` SDK) is shown the task and sample episodes and asked for criteria; the
criteria of its reply become a judge candidate (`search.judge_candidate`) of the tuning
(`grpo_jax.rubrics.tuning`). A reply without criteria, or a failed request, is a counted
failure, never an exception: the tuning goes on without a judge candidate.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from grpo_jax.components import build_env
from grpo_jax.rollout_store import read_rollouts
from grpo_jax.rubrics.judge import _render
from grpo_jax.rubrics.search import _print


@dataclasses.dataclass
class ProposalSettings:
    """`--propose_criteria`: the judge endpoint and how its criteria are used."""
    base_url: str
    model: str
    api_key: str = "EMPTY"
    weight: float = 0.3
    num_samples: int = 4
    max_criteria: int = 5
    attempts: int = 2
    task_description: str | None = None


PROPOSAL_SYSTEM = ("You design grading rubrics for reinforcement learning from verifiable rewards. "
                   "You write criteria that a grader can check on a single response, that reward "
                   "what makes a response correct and well formed, and that cannot be satisfied by "
                   "gaming the format alone.")
_ITEM = re.compile(r"^\s*(?:[-*+\u2022\u2023\u25e6]|\(?\d{1,2}[.):]|\(?[a-z][.)]|criterion\s*\d+\s*[:.)-])\s*(.*)$",
                   re.IGNORECASE)
_MARKDOWN = re.compile(r"(\*\*|__|`)")
MAX_CRITERION_CHARS = 300
MIN_CRITERION_WORDS = 3


def proposal_prompt(task_description: str, samples: Sequence[tuple[Any, Any, float | None]], *,
                    max_criteria: int = 5) -> list[dict]:
    """Chat messages showing a judge the task and sample episodes (prompt, completion, reward)
    and asking for a numbered list of at most `max_criteria` criteria, one a line."""

    shown = []
    for i, (prompt, completion, reward) in enumerate(samples, 1):
        score = "" if reward is None or not math.isfinite(float(reward)) else f" (current reward {float(reward):.2f})"
        shown.append(f"## Sample {i}{score}\n{_render(prompt)}\n\n{_render(completion)}")
    user = (f"# Task\n{task_description}\n\n# Sample episodes\n" + "\n\n".join(shown) +
            f"\n\n# Request\nPropose at most {max_criteria} criteria that a good response to this task "
            "meets, each checkable on one response on its own. Answer with a numbered list only, one "
            "criterion per line, like:\n1. <criterion>\n2. <criterion>")
    return [{"role": "system", "content": PROPOSAL_SYSTEM}, {"role": "user", "content": user}]


def parse_criteria(text: str | None, *, max_criteria: int = 5) -> list[str]:
    """The criteria of a judge's reply: the items of its numbered or bulleted list ("1.", "2)",
    "(3)", "-", "*", "Criterion 4:"), markdown emphasis removed; items too short (< 3 words) or
    too long (> 300 characters), headings (ending in ':'), verdict-format lines and duplicates are
    left out; at most `max_criteria`. Lines outside a list (preamble, reasoning) never count; a
    reply with no list gives []."""
    out, seen = [], set()
    for line in (text or "").splitlines():
        match = _ITEM.match(_MARKDOWN.sub("", line))
        if not match:
            continue
        item = re.sub(r"\s+", " ", match.group(1)).strip().strip('"').strip()
        if not item or item.endswith(":") or len(item) > MAX_CRITERION_CHARS:
            continue
        if len(re.findall(r"[A-Za-z]+", item)) < MIN_CRITERION_WORDS:
            continue
        if re.match(r"^(verdict|score)\s*[:=]", item, re.IGNORECASE):
            continue
        key = item.lower().rstrip(".")
        if key in seen:
            continue
        seen.add(key)
        out.append(item)
        if len(out) == max_criteria:
            break
    return out


@dataclasses.dataclass
class Proposal:
    """A judge's criteria, its replies, and the failed attempts (a reply without criteria, a
    failed request) with their errors."""
    criteria: list[str]
    replies: list[str]
    failures: int
    errors: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sync_client(base_url: str, api_key: str, timeout_s: float = 120.0):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=1)


def propose_criteria(task_description: str, samples: Sequence[tuple[Any, Any, float | None]], *, model: str,
                     client: Any = None, base_url: str | None = None, api_key: str = "EMPTY",
                     max_criteria: int = 5, attempts: int = 2, temperature: float = 0.0,
                     max_tokens: int = 512) -> Proposal:
    """Asks a judge model (`client.chat.completions.create`, an `openai.OpenAI`, or one made from
    `base_url`) for criteria of `task_description` given `samples`; up to `attempts` replies until
    one parses to at least one criterion. A reply without criteria, or a failed request, is a
    counted failure (`failures`, `errors`), never an exception."""
    if client is None:
        if base_url is None:
            raise ValueError("propose_criteria needs a `client` or a `base_url`")
        client = _sync_client(base_url, api_key)
    messages = proposal_prompt(task_description, samples, max_criteria=max_criteria)
    replies, errors, failures = [], [], 0
    for _ in range(max(1, attempts)):
        try:
            response = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                                      max_tokens=max_tokens)
            reply = response.choices[0].message.content or ""
        except Exception as e:  # noqa: BLE001  (an endpoint failing is a counted failure)
            failures += 1
            errors.append(f"{type(e).__name__}: {e}")
            continue
        replies.append(reply)
        criteria = parse_criteria(reply, max_criteria=max_criteria)
        if criteria:
            return Proposal(criteria, replies, failures, errors)
        failures += 1
        errors.append(f"no criteria in the reply: {reply[-200:]!r}")
    return Proposal([], replies, failures, errors)


def task_description(env) -> str:
    """A default description of an env's task: its system prompt and docstring's first paragraph."""
    doc = (type(env).__doc__ or "").strip().split("\n\n")[0]
    system = getattr(env, "system_prompt", None) or ""
    return " ".join(x for x in (doc, f"System prompt: {system}" if system else "") if x)


def sample_episodes(workdir: str | None, n: int) -> list[tuple[Any, Any, float | None]]:
    """`n` stored episodes of a run (the last step's, spread over its groups), as (prompt,
    completion, reward); [] without stored rollouts."""

    if not workdir:
        return []
    episodes = read_rollouts(workdir, on_error="skip")
    if not episodes:
        return []
    last = [e for e in episodes if e.step == episodes[-1].step]
    picks = np.linspace(0, len(last) - 1, num=min(n, len(last))).round().astype(int)
    return [(last[i].prompt, last[i].completion, last[i].reward) for i in sorted(set(picks.tolist()))]


def gold_samples(env, rows, n: int) -> list[tuple[Any, Any, float | None]]:
    """`n` gold demonstrations of an env as samples (when there are no stored rollouts)."""
    out = []
    for row in list(rows)[:n]:
        prompt, _ = env.initial_state(row)
        out.append((prompt, env.gold_completion(row), None))
    return out


def propose_from_samples(settings: ProposalSettings, base_config, rollouts_from: str | None, *, client: Any = None,
                         log: Callable[[str], None] = _print) -> Proposal:
    """`propose_criteria` for the tuner: the env's task description (or `settings.task_description`),
    samples from `rollouts_from` (else gold demonstrations)."""

    env = build_env(base_config.env)
    samples = sample_episodes(rollouts_from, settings.num_samples)
    if not samples:
        samples = gold_samples(env, env.dataset("train", n=settings.num_samples, seed=base_config.env.data_seed),
                               settings.num_samples)
    proposal = propose_criteria(settings.task_description or task_description(env), samples, model=settings.model,
                                client=client, base_url=settings.base_url, api_key=settings.api_key,
                                max_criteria=settings.max_criteria, attempts=settings.attempts)
    if proposal.criteria:
        log(f"judge proposed {len(proposal.criteria)} criteria ({proposal.failures} failed replies):")
        for i, c in enumerate(proposal.criteria, 1):
            log(f"  {i}. {c}")
    else:
        log(f"judge proposed no criteria ({proposal.failures} failed replies); no judge candidate. "
            f"Last error: {proposal.errors[-1] if proposal.errors else '-'}")
    return proposal


__all__ = ["ProposalSettings", "Proposal", "proposal_prompt", "parse_criteria", "propose_criteria",
           "task_description", "sample_episodes", "gold_samples", "propose_from_samples"]
