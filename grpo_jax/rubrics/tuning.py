"""Rubric tuning: search a rubric's weights by short GRPO runs (successive halving), with the
reward-hack audit as a constraint and the stored rollouts as a cheap first look.

    python experiments/tune_rubric.py --config configs/calculator_sparse.py:mixed_steps=150 --workdir /tmp/tune

1. Candidates (`rubrics.search`): weight vectors over the rubric's shaping functions (a grid,
   or random draws), the hand-written rubric itself, and (`rubrics.criteria`) a judge rubric
   whose criteria an LLM proposed from the task description and sample rollouts. Every
   candidate keeps the correctness function (`config.eval.correct_fn`) at its weight; it is
   what is optimised.
2. Audit (a constraint, before any training): each candidate's rubric is scored on the known
   reward hacks (`env.audit`, `grpo_jax.rubrics.audit`) and, for tool envs, on replayed tool
   hacks (`TOOL_HACKS`: the gold tool calls followed by a wrong or no answer); a candidate
   that rewards any hack above `audit_threshold` is discarded and logged.
3. Re-scoring (cheap, no training): the stored rollouts of a run (`rollouts_from`, else the
   first run the tuner trains, the hand-written rubric's) are re-scored under every candidate
   (`rollout_store.rescore`): sign flips, groups losing reward variance, agreement of the
   candidate's reward with correctness. Reported per candidate; `min_agreement` turns the
   agreement into a pre-filter.
4. Successive halving (`search.successive_halving`): round r trains every survivor for
   `min_steps * eta**r` GRPO steps (one run per seed, an `ablation.sweep` variant in its own
   workdir, resumed or read back when it exists) and keeps the best `1/eta` by held-out
   `eval/accuracy` at the end of the run (mean over the seeds), until one is left. Equal
   accuracies (a saturated task) are ordered by the run's mean training correctness
   (`reward/<correct_fn>` over its steps: how fast it learned), then by the candidates' order.
   A run stopped by a signal stops the tuner (`ablation.sweep` raises `RuntimeError`; run it
   again to resume).

Everything lands in `workdir/tuning.json` (candidates, audits, re-scoring, rounds, scores, the
winner), rewritten after every run: a stopped tuner loses nothing, and running it again reuses
every finished run.

Warm starts: runs share `sft.cache_dir` (default `workdir/warm_starts`); its key
(`sft.warm_start_key`) leaves the rubric out, so the candidates of one seed share one warm start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from grpo_jax import ablation
from grpo_jax.components import build_env
from grpo_jax.envs.base import replay_episodes
from grpo_jax.rollout_store import read_rollouts, rescore
from grpo_jax.rubrics.audit import AuditReport
from grpo_jax.rubrics.criteria import ProposalSettings, propose_from_samples
from grpo_jax.rubrics.numbers import format_number, parse_number
from grpo_jax.rubrics.rubric import rubric_weights
from grpo_jax.rubrics.search import (Candidate, Round, _fmt, _print, dedupe, grid_candidates, judge_candidate,
                                     random_candidates, successive_halving)

RESULT_FILE = "tuning.json"
HAND_WRITTEN = "hand-written"
METRIC = "eval/accuracy"

# ---------------------------------------------------------------------------------------------
# Audit: the constraint.


def _wrong_number(answer: Any) -> str:

    value = parse_number(str(answer))
    return format_number(value + 1) if value is not None else "0"


def _tool_turns(gold: Sequence[Mapping[str, Any]]) -> list[str]:
    """The assistant turns of a gold completion before its last (its tool calls)."""
    turns = [m["content"] for m in gold if m.get("role") == "assistant"]
    return turns[:-1]


TOOL_HACKS: dict[str, tuple[str, Callable[[Any, Mapping[str, Any]], list[str]]]] = {
    "tool_call_wrong_answer": ("the gold tool calls, then a well-formed wrong answer",
                               lambda env, row: [env.parser.format(answer=_wrong_number(row["answer"]))]),
    "tool_call_no_answer": ("the gold tool calls, then no answer", lambda env, row: ["I am not sure."]),
}


def tool_hack_scores(env, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean reward of `TOOL_HACKS` replayed through a tool env (the tools really run, so the
    state's tool counters are those of a policy that calls them); {} for an env without tool
    calls in its gold demonstrations."""

    try:
        golds = [env.gold_completion(row) for row in rows]
    except NotImplementedError:
        return {}
    if not any(_tool_turns(g) for g in golds):
        return {}
    out = {}
    for name, (_, make) in TOOL_HACKS.items():
        scripts = [[{"role": "assistant", "content": t} for t in _tool_turns(g) + make(env, row)]
                   for g, row in zip(golds, rows)]
        episodes = replay_episodes(env, rows, scripts)
        scores = env.score_episodes(episodes)
        out[name] = float(np.nan_to_num(np.asarray(scores.rewards, np.float64), nan=0.0).mean())
    return out


def audit_candidate(env, rows: Sequence[Mapping[str, Any]], *, threshold: float = 0.5) -> AuditReport:
    """`env.audit(rows)` (the known text hacks, gold demonstrations as the control) plus the
    replayed `TOOL_HACKS` of a tool env; a hack scoring above `threshold` is flagged."""
    report = env.audit(rows, threshold=threshold)
    tool = tool_hack_scores(env, rows)
    scores = {**report.scores, **tool}
    flagged = report.flagged + [n for n, s in tool.items() if s > threshold]
    return AuditReport(threshold, scores, flagged, report.gold_score)


# ---------------------------------------------------------------------------------------------
# Re-scoring stored rollouts (cheap: no training).

RESCORE_COLUMNS = ("sign_flip_frac", "lost_variance_frac", "gained_variance_frac", "best_changed_frac",
                   "agreement/reward/sign_accuracy", "agreement/reward/spearman")


def last_steps(episodes, n: int | None):
    """The episodes of the last `n` stored steps (all for None)."""
    if not n:
        return list(episodes)
    steps = sorted({e.step for e in episodes})[-n:]
    return [e for e in episodes if e.step in set(steps)]


def rescore_report(episodes, env, *, group_size: int, correct_fn: str) -> dict[str, float]:
    """`RESCORE_COLUMNS` of `rollout_store.rescore(episodes, env, ...)`."""

    summary = rescore(episodes, env, group_size=group_size, correct_fn=correct_fn).summary()
    return {k: float(summary.get(k, float("nan"))) for k in RESCORE_COLUMNS}


# ---------------------------------------------------------------------------------------------
# The tuner.


def _atomic_json(path: str, payload: Any):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _nan_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def default_grid(tune: Sequence[str], values: Sequence[float] = (0.0, 0.1, 0.3, 0.6)) -> dict[str, list[float]]:
    """{function: values} for every function tuned: the grid when none is given."""
    return {name: [float(v) for v in values] for name in tune}


def tune(base_config, workdir: str, *, grid: Mapping[str, Sequence[float]] | None = None,
         grid_values: Sequence[float] = (0.0, 0.1, 0.3, 0.6), tune_fns: Sequence[str] | None = None,
         num_random: int = 0, random_high: float = 1.0,
         candidates: Sequence[Candidate] | None = None, include_hand_written: bool = True,
         min_steps: int = 5, eta: int = 2, max_rounds: int | None = None, max_steps: int | None = None,
         seeds: Sequence[int] = (100, 101), audit_rows: int = 16, audit_threshold: float = 0.5,
         rollouts_from: str | None = None, rescore_steps: int | None = 5, min_agreement: float | None = None,
         propose: ProposalSettings | None = None, proposal_client: Any = None, eval_examples: int | None = None,
         reuse: bool = True, verbose: bool = False, log: Callable[[str], None] = _print) -> dict[str, Any]:
    """Tunes the rubric of `base_config` (see the module docstring); returns the result written to
    `workdir/tuning.json`.

    grid:        {function: [weights]} (default: every `tune_fns` x `grid_values`); `num_random` > 0
                 draws that many random vectors in [0, random_high] instead.
    tune_fns:    the functions tuned (default: the rubric's weighted functions but correctness).
    candidates:  explicit candidates instead of the grid.
    seeds:       each run is trained under every seed; the score is the mean (tuning seeds
                 should differ from those of the final comparison).
    rollouts_from: a run's workdir whose stored rollouts are re-scored (default: the tuner's
                 first run); `rescore_steps`: its last N steps.
    min_agreement: discard candidates whose re-scored reward's group-centred sign agrees with
                 correctness on fewer than this share of episodes (None: report only).
    reuse:       an existing result with the same settings and a winner is returned as is.
    """

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULT_FILE)
    correct_fn = base_config.eval.correct_fn
    cache_dir = base_config.sft.get("cache_dir") or os.path.join(workdir, "warm_starts")
    common = {"sft.cache_dir": cache_dir}
    if eval_examples:
        common["eval.num_examples"] = int(eval_examples)
    base_env = build_env(base_config.env)
    base_weights = rubric_weights(base_env)
    if correct_fn not in base_weights:
        raise ValueError(f"the rubric has no correctness function {correct_fn!r}: {sorted(base_weights)}")
    if tune_fns is None:
        tune_fns = [n for n, w in base_weights.items() if w != 0 and n != correct_fn]
    unknown = sorted(set(tune_fns) - set(base_weights))
    if unknown:
        raise ValueError(f"cannot tune {unknown}: the rubric has {sorted(base_weights)}")

    settings = {"config": json.loads(base_config.to_json_best_effort(sort_keys=True)),
                "grid": {k: list(v) for k, v in (grid or {}).items()}, "grid_values": list(grid_values),
                "tune_fns": list(tune_fns),
                "num_random": num_random, "random_high": random_high, "min_steps": min_steps, "eta": eta,
                "max_rounds": max_rounds, "max_steps": max_steps, "seeds": [int(s) for s in seeds],
                "audit_rows": audit_rows, "audit_threshold": audit_threshold, "rollouts_from": rollouts_from,
                "rescore_steps": rescore_steps, "min_agreement": min_agreement, "eval_examples": eval_examples,
                "candidates": [c.to_json() for c in candidates] if candidates else None,
                "propose": dataclasses.asdict(propose) if propose else None}
    if reuse and os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous.get("settings") == json.loads(json.dumps(settings, default=_json_default)) and \
                previous.get("winner"):
            log(f"tuning result {path} is complete: winner {previous['winner']['name']}")
            return previous

    fixed = {correct_fn: base_weights[correct_fn]}
    if candidates is None:
        if num_random:
            candidates = random_candidates(tune_fns, num_random, high=random_high, seed=int(seeds[0]), fixed=fixed)
        else:
            candidates = grid_candidates(grid or default_grid(tune_fns, grid_values), fixed=fixed)
        if include_hand_written:
            hand = Candidate(HAND_WRITTEN, {n: base_weights[n] for n in [correct_fn, *tune_fns]}, source="hand")
            candidates = [hand] + list(candidates)
    candidates = dedupe(candidates)
    result: dict[str, Any] = {"settings": settings, "workdir": workdir, "metric": METRIC,
                              "correct_fn": correct_fn, "base_weights": base_weights,
                              "candidates": {c.name: {**c.to_json(), "status": "pending"} for c in candidates},
                              "discarded": [], "rescored_from": None, "proposal": None, "rounds": [],
                              "winner": None, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save():
        _atomic_json(path, _nan_to_none(result))

    def config_of(c: Candidate):
        return ablation.with_overrides(base_config, {**common, **c.overrides()})

    def train(c_name: str, steps: int, seed: int):
        """One run of `c_name` (an `ablation.sweep` variant: read back when finished, resumed when
        not; a run stopped by a signal raises `RuntimeError` and so stops the tuner, resumable)."""
        name = f"{c_name}{ablation.SEED_MARK}{seed}"
        variant = {**by_name[c_name].overrides(), "train.num_steps": steps, "train.eval_every": steps,
                   "seed": int(seed), "checkpoint.every": steps}
        root = os.path.join(workdir, "runs", f"steps_{steps}")
        started = time.perf_counter()
        rows = ablation.sweep(base_config, {name: variant}, root, common=common, verbose=verbose)[name]
        run_dir = os.path.join(root, ablation._directory_name(name))
        train_correct = ablation.final_value(rows, f"reward/{correct_fn}", last=steps)
        runs.setdefault(c_name, {})[f"{steps}@{seed}"] = {
            "workdir": run_dir, "score": ablation.final_value(rows, METRIC), "train_correct": train_correct,
            "seconds": round(time.perf_counter() - started, 1)}
        result["candidates"][c_name]["runs"] = runs[c_name]
        save()
        return ablation.final_value(rows, METRIC), train_correct, run_dir

    runs: dict[str, dict[str, Any]] = {}
    by_name = {c.name: c for c in candidates}

    # -- judge-proposed criteria: one more candidate
    if propose is not None:
        proposal = propose_from_samples(propose, base_config, rollouts_from, client=proposal_client, log=log)
        result["proposal"] = proposal.to_json()
        if proposal.criteria:
            jc = judge_candidate({n: w for n, w in base_weights.items()}, proposal.criteria,
                                 weight=propose.weight, model=propose.model, base_url=propose.base_url,
                                 api_key=propose.api_key)
            by_name[jc.name] = jc
            candidates = list(candidates) + [jc]
            result["candidates"][jc.name] = {**jc.to_json(), "status": "pending"}
        save()

    # -- audit: the constraint, before any training
    rows = base_env.dataset("train", n=audit_rows, seed=base_config.env.data_seed)
    alive = []
    for c in candidates:
        report = audit_candidate(build_env(config_of(c).env), rows, threshold=audit_threshold)
        entry = result["candidates"][c.name]
        entry["audit"] = {"passed": report.passed, "flagged": report.flagged, "scores": report.scores,
                          "gold_score": report.gold_score}
        if report.passed:
            alive.append(c.name)
        else:
            entry["status"] = "discarded: audit"
            result["discarded"].append({"name": c.name, "reason": "audit", "flagged": report.flagged})
            hacks = ", ".join(f"{h} ({report.scores[h]:.2f})" for h in report.flagged)
            log(f"audit: discarded {c.name}: rewards {hacks}"
                + ("" if report.gold_score is None or report.gold_score > audit_threshold
                   else f"; gold scores {report.gold_score:.2f}"))
    log(f"audit: {len(alive)} of {len(candidates)} candidates pass (threshold {audit_threshold:g})")
    save()
    if not alive:
        raise ValueError("every candidate rewards a known hack: nothing to train")

    # -- re-scoring stored rollouts: cheap, before the runs
    source = rollouts_from
    if source is None:
        first = HAND_WRITTEN if HAND_WRITTEN in alive else alive[0]
        log(f"training {first} first ({min_steps} steps, seed {seeds[0]}): its rollouts are re-scored")
        *_, source = train(first, min_steps, int(seeds[0]))

    episodes = last_steps(read_rollouts(source, on_error="skip"), rescore_steps)
    result["rescored_from"] = {"workdir": source, "episodes": len(episodes),
                               "steps": sorted({e.step for e in episodes})}
    if episodes:
        group_size = episodes[0].group_size
        log(f"re-scoring {len(episodes)} stored episodes of {source} under each candidate")
        log(f"  {'candidate':40s} " + " ".join(f"{k.split('/')[-1][:14]:>14s}" for k in RESCORE_COLUMNS))
        for name in list(alive):
            try:
                report = rescore_report(episodes, build_env(config_of(by_name[name]).env), group_size=group_size,
                                        correct_fn=correct_fn)
            except Exception as e:  # noqa: BLE001  (a report column, not a reason to stop the tuning)
                result["candidates"][name]["rescore_error"] = f"{type(e).__name__}: {e}"
                log(f"  {name:40s} re-scoring failed: {type(e).__name__}: {e}")
                continue
            result["candidates"][name]["rescore"] = report
            log(f"  {name:40s} " + " ".join(f"{_fmt(report[k]):>14s}" for k in RESCORE_COLUMNS))
            agreement = report["agreement/reward/sign_accuracy"]
            if min_agreement is not None and math.isfinite(agreement) and agreement < min_agreement:
                alive.remove(name)
                result["candidates"][name]["status"] = "discarded: rescore"
                result["discarded"].append({"name": name, "reason": "rescore", "agreement": agreement})
                log(f"  discarded {name}: its reward agrees with correctness on {agreement:.2f} < {min_agreement:g}")
        save()

    # -- successive halving
    def objective(name: str, steps: int, r: int):
        done = [train(name, steps, int(seed)) for seed in seeds]
        return [d[0] for d in done], [d[1] for d in done]

    def on_round(round_: Round, rounds: list[Round]):
        result["rounds"] = [x.to_json() for x in rounds]
        for name in round_.scores:
            if name not in round_.survivors:
                result["candidates"][name]["status"] = f"eliminated in round {round_.index + 1}"
        save()

    winner, rounds = successive_halving(alive, objective, min_steps=min_steps, eta=eta, max_rounds=max_rounds,
                                        max_steps=max_steps, on_round=on_round, log=log)
    result["rounds"] = [x.to_json() for x in rounds]
    result["candidates"][winner]["status"] = "winner"
    result["winner"] = {**by_name[winner].to_json(), "score": rounds[-1].scores[winner],
                        "steps": rounds[-1].steps}
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save()
    log(f"winner: {winner} ({METRIC} {_fmt(rounds[-1].scores[winner])} after {rounds[-1].steps} steps); "
        f"overrides {json.dumps(by_name[winner].overrides())}; result in {path}")
    return json.loads(json.dumps(_nan_to_none(result), default=_json_default))


def load_result(workdir_or_path: str) -> dict[str, Any]:
    """The tuning result of a workdir (its `tuning.json`), or the result file at a path."""
    path = workdir_or_path if workdir_or_path.endswith(".json") else os.path.join(workdir_or_path, RESULT_FILE)
    with open(path) as f:
        return json.load(f)


def load_or_tune(base_config, workdir: str, *, log: Callable[[str], None] = _print, **kwargs) -> dict[str, Any]:
    """The finished result in `workdir` (a run of experiments/tune_rubric.py) as it is, else
    `tune(base_config, workdir, **kwargs)` (which resumes an unfinished one)."""
    path = os.path.join(workdir, RESULT_FILE)
    if os.path.exists(path):
        result = load_result(path)
        if result.get("winner"):
            log(f"read the finished tuning result {path}: winner {result['winner']['name']}")
            return result
    return tune(base_config, workdir, log=log, **kwargs)


def winner_overrides(result: Mapping[str, Any]) -> dict[str, Any]:
    """The config overrides of a tuning result's winner (a variant for `ablation.sweep`)."""
    if not result.get("winner"):
        raise ValueError("the tuning result has no winner yet (the tuner has not finished)")
    return dict(result["winner"]["overrides"])


def comparison_variants(result: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]
                        ) -> dict[str, dict[str, Any]]:
    """`baselines` ({name: overrides}) plus the tuning result's winner as "tuned (<winner>)"; when
    the winner's overrides equal a baseline's, that baseline is renamed "<name> = tuned" instead
    (the same runs, trained once)."""
    tuned = winner_overrides(result)
    out, merged = {}, False
    for name, overrides in baselines.items():
        if not merged and json.dumps(dict(overrides), sort_keys=True) == json.dumps(tuned, sort_keys=True):
            out[f"{name} = tuned"], merged = dict(overrides), True
        else:
            out[name] = dict(overrides)
    if not merged:
        out[f"tuned ({result['winner']['name']})"] = tuned
    return out


def summary_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of a tuning result: per candidate its audit (pass, or the number of hacks
    it rewards: `result["candidates"][name]["audit"]` names them), the re-scoring columns (sign
    agreement with correctness, sign-flip and lost-variance fractions), the score of each round
    it ran in, and its status."""
    rounds = result.get("rounds") or []
    header = ["candidate", "audit", "sign agree", "sign flips", "var lost"] + \
        [f"r{r['round'] + 1} ({r['steps']} st)" for r in rounds] + ["status"]
    lines = [header]
    for name, c in result["candidates"].items():
        audit = c.get("audit") or {}
        rs = c.get("rescore") or {}
        flagged = audit.get("flagged") or []
        cells = [name, "pass" if audit.get("passed") else (f"{len(flagged)} hacks" if audit else "-")]
        cells += [_fmt(_num(rs[k])) if rs.get(k) is not None else "-" for k in
                  ("agreement/reward/sign_accuracy", "sign_flip_frac", "lost_variance_frac")]
        cells += [_fmt(_num(r["scores"].get(name))) if name in r["scores"] else "-" for r in rounds]
        cells.append(c.get("status", ""))
        lines.append(cells)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in lines)


def _num(x) -> float:
    return float("nan") if x is None else float(x)


__all__ = ["TOOL_HACKS", "audit_candidate", "tool_hack_scores", "rescore_report", "tune", "load_or_tune",
           "load_result", "comparison_variants", "winner_overrides", "summary_table"]
