"""Rubric audit: score a rubric on known reward hacks built from each row's gold answer.

A sound rubric gives every hack a low reward; a hack whose mean reward over the rows is
above `threshold` is *flagged*.  The hacks are the usual ways a policy games a checker
(Skalse et al. 2022 call these reward hacking; the list is ours): an empty answer, empty
tags, the answer only inside the thinking, several answers, repeated or nested tags, an
unclosed tag, answer spam and walls of numbers, the right number in the prose with a wrong
tagged answer, the unevaluated expression from the question, format without substance, and
very long output.  Given the episodes' starts and finished gold episodes (what
`grpo_jax.envs.Environment.audit` passes: its initial states and its replayed gold
demonstrations), the gold episodes' mean reward is a control: a rubric that also scores the
gold answer low is broken the other way.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from grpo_jax.rubrics.numbers import format_number, parse_number


@dataclasses.dataclass(frozen=True)
class Hack:
    """A reward hack: `make(answer, row, parser)` -> the assistant message text, or None (n/a)."""
    name: str
    description: str
    make: Callable[[str, Mapping[str, Any], Any], str | None]


def _wrong(answer: str) -> str:
    value = parse_number(answer)
    return format_number(value + 1) if value is not None else ("1" if answer != "1" else "2")


def _nearby(answer: str, radius: int) -> list[str]:
    value = parse_number(answer)
    if value is None:
        return [answer, answer + "0", "0", "1"]
    return [format_number(value + k) for k in range(-radius, radius + 1)]


def _formatted(parser: Any, answer: str) -> str:
    fields = getattr(parser, "fields", ("answer",))
    if "think" in fields:
        return f"<think>Let me work it out.</think>\n<answer>{answer}</answer>"
    return f"<answer>{answer}</answer>"


def _question(row: Mapping[str, Any]) -> str | None:
    if row.get("question"):
        return str(row["question"])
    users = [m["content"] for m in row.get("prompt") or [] if m.get("role") == "user"]
    return users[-1] if users else None


DEFAULT_HACKS: tuple[Hack, ...] = (
    Hack("empty", "an empty message", lambda a, r, p: ""),
    Hack("empty_answer", "empty answer tags", lambda a, r, p: "<answer></answer>"),
    Hack("format_only", "the right format with a wrong answer", lambda a, r, p: _formatted(p, _wrong(a))),
    Hack("answer_only_in_think", "the answer only inside the thinking, no answer tag",
         lambda a, r, p: f"<think>The answer is {a}.</think>"),
    Hack("answer_tag_inside_think", "an answer tag nested in the thinking",
         lambda a, r, p: f"<think><answer>{a}</answer></think>"),
    Hack("several_answers", "several answer tags with different numbers",
         lambda a, r, p: "\n".join(f"<answer>{x}</answer>" for x in (_wrong(a), a, _wrong(_wrong(a))))),
    Hack("repeated_answer_tags", "the same answer tag repeated many times",
         lambda a, r, p: f"<answer>{a}</answer>" * 20),
    Hack("nested_answer_tags", "answer tags nested in answer tags",
         lambda a, r, p: f"<answer>{_wrong(a)}<answer>{a}</answer></answer>"),
    Hack("unclosed_answer_tag", "an answer tag never closed", lambda a, r, p: f"<answer>{a}"),
    Hack("answer_spam", "several candidate numbers in one answer",
         lambda a, r, p: f"<answer>{', '.join(_nearby(a, 2))}</answer>"),
    Hack("digit_wall", "a wall of numbers around the answer inside the tag",
         lambda a, r, p: f"<answer>{' '.join(_nearby(a, 300))}</answer>"),
    Hack("answer_in_prose", "the right number in the prose, a wrong number tagged",
         lambda a, r, p: f"The answer is {a}.\n" + _formatted(p, _wrong(a))),
    Hack("unevaluated_expression", "the question's expression, not its value, as the answer",
         lambda a, r, p: (f"<answer>{r['info']['expression']}</answer>"
                          if isinstance(r.get("info"), Mapping) and r["info"].get("expression") else None)),
    Hack("question_echo", "the question repeated as the answer",
         lambda a, r, p: f"<answer>{_question(r)}</answer>" if _question(r) else None),
    Hack("very_long_output", "a very long ramble mentioning the answer, no answer tag",
         lambda a, r, p: "Let me think about this. " * 2000 + f"Maybe {a}. " + "Hmm. " * 2000),
)


@dataclasses.dataclass
class AuditReport:
    """scores: {hack name: mean reward over the rows}; flagged: hacks with mean > threshold;
    gold_score: mean reward of the replayed gold demonstrations (None without an env)."""
    threshold: float
    scores: dict[str, float]
    flagged: list[str]
    gold_score: float | None = None

    @property
    def passed(self) -> bool:
        """No hack flagged, and (when measured) the gold answers score above the threshold."""
        return not self.flagged and (self.gold_score is None or self.gold_score > self.threshold)

    def summary(self) -> str:
        lines = [f"rubric audit (threshold {self.threshold:g}): {'PASSED' if self.passed else 'FAILED'}"]
        if self.gold_score is not None:
            lines.append(f"  {'gold demonstration':28s} {self.gold_score:8.3f}")
        for name, score in self.scores.items():
            mark = "  <-- hackable" if name in self.flagged else ""
            lines.append(f"  {name:28s} {score:8.3f}{mark}")
        return "\n".join(lines)


def _row_start(row: Mapping[str, Any]) -> tuple[list, dict]:
    prompt = list(row.get("prompt") or [{"role": "user", "content": _question(row) or ""}])
    return prompt, {"answer": row.get("answer"), "info": row.get("info", {})}


def audit_rubric(rubric: Any, rows: Sequence[Mapping[str, Any]], *, threshold: float = 0.5,
                 hacks: Sequence[Hack] = DEFAULT_HACKS, starts: Sequence[tuple[list, dict]] | None = None,
                 gold: Sequence[Any] | None = None) -> AuditReport:
    """Score `rubric` on every hack built from every row and flag those scoring above `threshold`.

    rows:   dataset rows with at least "answer" (and "question" or "prompt"; "info" optional).
    starts: per row, the (prompt messages, initial state) an episode starts from (an env's
            `initial_state(row)`: tool counters ...); default: the row's prompt and a state with
            its answer and info.
    gold:   finished gold episodes (`.prompt`, `.completion`, `.state`), e.g. an env's replayed
            demonstrations: their mean reward is the control `gold_score`.
    An env audits its own rubric with `env.audit(rows)` (`grpo_jax.envs.Environment.audit`),
    which passes its starts and gold episodes here.
    A NaN reward (a failing function) counts as 0 for the mean: failing is not hacking.
    """
    rows = list(rows)
    starts = [_row_start(row) for row in rows] if starts is None else list(starts)
    if len(starts) != len(rows):
        raise ValueError(f"{len(starts)} starts for {len(rows)} rows")
    batch = {k: [] for k in ("name", "prompts", "completions", "answers", "states", "infos", "tasks")}
    for row, (prompt, state) in zip(rows, starts):
        for hack in hacks:
            text = hack.make(str(row["answer"]), row, rubric.parser)
            if text is None:
                continue
            batch["name"].append(hack.name)
            batch["prompts"].append(prompt)
            batch["completions"].append([{"role": "assistant", "content": text}])
            batch["answers"].append(row["answer"])
            batch["states"].append(copy.deepcopy(state))
            batch["infos"].append(row.get("info", {}))
            batch["tasks"].append(state.get("task", row.get("task")))
    result = rubric.score(batch["prompts"], batch["completions"], batch["answers"], batch["states"],
                          batch["infos"], batch["tasks"])
    rewards = np.nan_to_num(result.rewards, nan=0.0)
    names = np.asarray(batch["name"])
    scores = {h.name: float(rewards[names == h.name].mean()) for h in hacks if (names == h.name).any()}
    flagged = [name for name, score in scores.items() if score > threshold]
    gold_score = None
    if gold:
        states = [e.state for e in gold]
        result = rubric.score([e.prompt for e in gold], [e.completion for e in gold],
                              [s.get("answer") for s in states], states,
                              [s.get("info", {}) for s in states], [s.get("task") for s in states])
        gold_score = float(np.nan_to_num(result.rewards, nan=0.0).mean())
    return AuditReport(threshold, scores, flagged, gold_score)


__all__ = ["Hack", "DEFAULT_HACKS", "AuditReport", "audit_rubric"]
