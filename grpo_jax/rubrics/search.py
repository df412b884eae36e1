"""What the rubric tuner searches and how it narrows it down, with no env and no training:
candidate rubrics (weight vectors over a rubric's functions, a grid or random draws, and a
judge rubric as `env.rubric.funcs`) and successive halving over them (`objective` trains).
The tuner (`grpo_jax.rubrics.tuning`) puts them together with the audit and the runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

JUDGE_FN = "grpo_jax.rubrics.judge:llm_judge"


def _print(line: str) -> None:
    """The default `log` of the tuning's functions: the line on stdout, flushed at once."""
    print(line, flush=True)


def _fmt(x: float) -> str:
    """A score as the tuning's logs and tables show it (3 decimals, "nan" when not finite)."""
    return f"{x:.3f}" if isinstance(x, (int, float)) and math.isfinite(x) else "nan"


# ---------------------------------------------------------------------------------------------
# Candidates.


@dataclasses.dataclass
class Candidate:
    """A rubric to try: `weights` override the env rubric's weights (`env.rubric_weights`);
    `funcs`, when set, replaces the rubric (`env.rubric.funcs`, e.g. with a judge)."""
    name: str
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    funcs: dict[str, Any] | None = None
    source: str = "grid"

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.funcs is not None:
            out["env.rubric.funcs"] = self.funcs
        if self.weights:
            out["env.rubric_weights"] = dict(self.weights)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "weights": self.weights, "funcs": self.funcs,
                "overrides": self.overrides()}


def candidate_name(weights: Mapping[str, float]) -> str:
    """"strict_format=0.1,tool_used=0.3" (no '@': that marks seeds in `ablation`)."""
    return ",".join(f"{k}={v:g}" for k, v in weights.items())


def grid_candidates(values: Mapping[str, Sequence[float]], fixed: Mapping[str, float] | None = None
                    ) -> list[Candidate]:
    """Every combination of `values` ({function: [weights]}), with `fixed` weights added to each."""
    names = list(values)
    out = []
    for combo in itertools.product(*(values[n] for n in names)):
        tuned = {n: float(v) for n, v in zip(names, combo)}
        out.append(Candidate(candidate_name(tuned), {**(fixed or {}), **tuned}, source="grid"))
    return out


def random_candidates(names: Sequence[str], n: int, *, low: float = 0.0, high: float = 1.0, seed: int = 0,
                      fixed: Mapping[str, float] | None = None, decimals: int = 2) -> list[Candidate]:
    """`n` distinct weight vectors drawn uniformly from [low, high] per function (rounded)."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for _ in range(100 * n):
        if len(out) == n:
            break
        tuned = {name: float(round(rng.uniform(low, high), decimals)) for name in names}
        key = tuple(tuned.values())
        if key not in seen:
            seen.add(key)
            out.append(Candidate(candidate_name(tuned), {**(fixed or {}), **tuned}, source="random"))
    return out


def judge_candidate(base_weights: Mapping[str, float], criteria: Sequence[str], *, weight: float,
                    model: str, base_url: str, api_key: str = "EMPTY", name: str = "judge",
                    max_tokens: int = 512, candidate: str | None = None,
                    base_funcs: Mapping[str, Any] | None = None) -> Candidate:
    """The base rubric plus an `llm_judge` of `criteria` at `weight`, as `env.rubric.funcs`.

    `base_funcs`: the base rubric as `env.rubric.funcs` entries (default: the calculator-style
    functions named like the factories of `registry.TEXT_REWARDS`; "strict_format" is
    `format_reward`)."""
    if base_funcs is None:
        aliases = {"strict_format": "format_reward", "tool_calls": "tool_calls_metric",
                   "tool_errors": "tool_errors_metric", "lenient_format": "format_reward"}
        base_funcs = {}
        for fn, w in base_weights.items():
            spec: dict[str, Any] = {"weight": float(w)}
            if fn in aliases:
                spec["fn"] = aliases[fn]
            if fn == "lenient_format":
                spec["strict"] = False
            base_funcs[fn] = spec
    funcs = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base_funcs.items()}
    funcs[name] = {"fn": JUDGE_FN, "weight": float(weight), "criteria": list(criteria), "model": model,
                   "base_url": base_url, "api_key": api_key, "max_tokens": int(max_tokens)}
    return Candidate(candidate or f"{name}={weight:g}", funcs=funcs, source="judge")


def dedupe(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates with distinct names and distinct rubrics (the first kept)."""
    out, names, rubrics = [], set(), set()
    for c in candidates:
        key = json.dumps(c.overrides(), sort_keys=True)
        if c.name in names or key in rubrics:
            continue
        names.add(c.name)
        rubrics.add(key)
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# Successive halving (no training here: `objective` trains).


@dataclasses.dataclass
class Round:
    """A round of successive halving: its steps, each candidate's score (the finite mean of its
    `per_seed` scores) and tiebreak, and the names it kept."""
    index: int
    steps: int
    scores: dict[str, float]
    per_seed: dict[str, list[float]]
    survivors: list[str]
    tiebreaks: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"round": self.index, "steps": self.steps, "scores": self.scores, "per_seed": self.per_seed,
                "tiebreaks": self.tiebreaks, "survivors": self.survivors}


def _score(values) -> tuple[float, list[float]]:
    values = [float(v) for v in np.atleast_1d(np.asarray(values, np.float64))]
    finite = [v for v in values if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("nan")), values


def keep_best(scores: Mapping[str, float], order: Sequence[str], keep: int,
              tiebreaks: Mapping[str, float] | None = None) -> list[str]:
    """The `keep` best names by score (NaN last); equal scores by `tiebreaks` (higher first, NaN
    last), then by their place in `order`."""
    rank = {name: i for i, name in enumerate(order)}
    tiebreaks = tiebreaks or {}

    def key(n):
        s, t = scores[n], tiebreaks.get(n, float("nan"))
        return (not math.isfinite(s), -s if math.isfinite(s) else 0.0, not math.isfinite(t),
                -t if math.isfinite(t) else 0.0, rank[n])
    return sorted(scores, key=key)[:keep]


def halving_schedule(n: int, *, min_steps: int, eta: int = 2, max_rounds: int | None = None,
                     max_steps: int | None = None) -> list[tuple[int, int]]:
    """[(candidates trained, steps)] per round: n, n//eta, ... down to the first round of 1 or 2
    candidates (the last, which picks the winner), steps min_steps * eta**r (capped at max_steps)."""
    if eta < 2:
        raise ValueError(f"eta must be >= 2, got {eta}")
    out, alive, r = [], n, 0
    while alive >= 1:
        steps = min_steps * eta ** r
        out.append((alive, min(steps, max_steps) if max_steps else steps))
        if alive <= eta - 1 or alive == 1 or (max_rounds is not None and len(out) >= max_rounds):
            break
        alive, r = max(1, alive // eta), r + 1
        if alive == 1:
            break
    return out


def successive_halving(names: Sequence[str], objective: Callable[[str, int, int], Any], *, min_steps: int,
                       eta: int = 2, max_rounds: int | None = None, max_steps: int | None = None,
                       on_round: Callable[[Round, list[Round]], None] | None = None,
                       log: Callable[[str], None] = _print) -> tuple[str | None, list[Round]]:
    """Successive halving over `names`: round r calls `objective(name, steps, r)` for every
    survivor and keeps the best `len // eta` (at least 1); the last round keeps one, the winner.
    The objective returns a score, or one per seed (their finite mean is the score; NaN ranks
    last), or a pair (scores, tiebreaks): equal scores are ordered by the tiebreaks' mean, then
    by the candidates' order. Returns (winner, rounds)."""
    names = list(names)
    if not names:
        return None, []
    schedule = halving_schedule(len(names), min_steps=min_steps, eta=eta, max_rounds=max_rounds,
                                max_steps=max_steps)
    alive, rounds = names, []
    for r, (_, steps) in enumerate(schedule):
        log(f"round {r + 1}/{len(schedule)}: {len(alive)} candidates x {steps} steps")
        scores, per_seed, tiebreaks = {}, {}, {}
        for name in alive:
            value = objective(name, steps, r)
            if isinstance(value, tuple):
                value, tiebreaks[name] = value[0], _score(value[1])[0]
            scores[name], per_seed[name] = _score(value)
            tie = f", tiebreak {_fmt(tiebreaks[name])}" if name in tiebreaks else ""
            log(f"  round {r + 1} {name}: {_fmt(scores[name])}  (per seed {', '.join(map(_fmt, per_seed[name]))}{tie})")
        last = r == len(schedule) - 1
        survivors = keep_best(scores, names, 1 if last else max(1, len(alive) // eta), tiebreaks)
        rounds.append(Round(r, steps, scores, per_seed, survivors, tiebreaks))
        dropped = [n for n in alive if n not in survivors]
        log(f"round {r + 1}: kept {survivors}" + (f", dropped {dropped}" if dropped else ""))
        if on_round:
            on_round(rounds[-1], rounds)
        alive = survivors
    return alive[0], rounds


__all__ = ["Candidate", "Round", "JUDGE_FN", "candidate_name", "grid_candidates", "random_candidates",
           "judge_candidate", "dedupe", "successive_halving", "halving_schedule", "keep_best"]
