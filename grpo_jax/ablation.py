"""Ablation sweeps for the notebooks: run one config under several overrides, plot, tabulate.

    variants = {"grpo": {"grpo.loss_type": "grpo"},
                "dapo": {"grpo.loss_type": "dapo", "grpo.epsilon_high": 0.28}}
    results = sweep(load_config("arithmetic_tiny"), variants, "/tmp/loss_ablation")
    plot_curves(results, keys=("reward", "eval/accuracy"))
    print(results_table(results))

A variant is a mapping from dotted config fields to values, applied to a copy of the locked base
config (a mistyped field fails, as on the command line). Each variant trains with
`trainer.run` in `workdir_root/<variant>`; its rows of `metrics.jsonl` are the result. Running a
sweep again reads finished variants back (nothing built), resumes unfinished ones (`trainer.run`
resumes from checkpoints), and refuses a workdir left by a different config. A variant stopped
by a signal stops the sweep (`RuntimeError`; run it again to resume).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import re
import time
from typing import Any, Mapping, Sequence

import numpy as np

Rows = list[dict[str, float]]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANT_FILE = "variant.json"


def load_config(name: str, arg: str = ""):
    """`get_config(arg)` of `configs/<name>.py` in this source tree (or of a path to a config file)."""
    path = name if name.endswith(".py") else os.path.join(REPO_ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def with_overrides(config, overrides: Mapping[str, Any]):
    """A copy of the (locked) `config` with dotted fields set: {"grpo.loss_type": "dapo"}.

    Fields must already exist (a typo raises, naming the field); a dict value replaces a
    sub-config whole (e.g. "env.rubric_weights").
    """
    config = copy.deepcopy(config)
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise KeyError(f"config has no field {'.'.join(parents[:i + 1])!r} (override {path!r})")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config has no field {path!r}; {'.'.join(parents) or 'the config'} has "
                           f"{sorted(node.keys())}")
        setattr(node, leaf, value)
    return config


def _directory_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "variant"


def _check_workdir(workdir: str, config) -> None:
    """Records the variant's config in its workdir, or checks that the one recorded is the same."""
    path = os.path.join(workdir, VARIANT_FILE)
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        if _set_fields(recorded) != _set_fields(current):
            recorded, current = _set_fields(recorded), _set_fields(current)
            changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
            raise ValueError(f"{workdir} holds a run of a different config (groups {changed} differ): "
                             "delete it or choose another workdir_root")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(current, f, indent=1, sort_keys=True)


def _set_fields(tree):
    """The config without its unset (None) fields: a field added to the schema since a run was
    recorded, off by default, does not make the run another config's."""
    if isinstance(tree, dict):
        return {k: _set_fields(v) for k, v in tree.items() if v is not None}
    return tree


def sweep(base_config, variants: Mapping[str, Mapping[str, Any]], workdir_root: str, *,
          common: Mapping[str, Any] | None = None, verbose: bool = False) -> dict[str, Rows]:
    """Trains `base_config` once per variant and returns {variant: rows of its metrics.jsonl}.

    Args:
      base_config: a locked experiment config (`load_config`).
      variants: {name: {dotted field: value}}; the name also names the variant's workdir.
      workdir_root: each variant runs in `workdir_root/<name>` (resumed if it exists).
      common: overrides applied to every variant before its own.
      verbose: print the trainer's progress lines; otherwise they go to
        `workdir_root/<name>/progress.txt` and one line per variant is printed.

    Every variant's config is built and validated before the first one trains, so a bad
    override fails in seconds rather than after the variants before it.
    """
    from grpo_jax import config_utils, trainer
    from grpo_jax.metrics import read_metrics

    configs, workdirs = {}, {}
    for name, overrides in variants.items():
        config = with_overrides(base_config, {**(common or {}), **overrides})
        config_utils.validate(config)
        workdir = os.path.join(workdir_root, _directory_name(name))
        if workdir in workdirs.values():
            raise ValueError(f"variant names {list(variants)} map to the same directory {workdir}")
        configs[name], workdirs[name] = config, workdir
    results = {}
    for name, config in configs.items():
        workdir = workdirs[name]
        _check_workdir(workdir, config)
        started = time.perf_counter()
        finished = _finished_rows(workdir, config)
        if finished is not None:  # read back, nothing built
            results[name] = finished
            print(f"{name}: read back from {workdir} ({_accuracy_line(finished)})", flush=True)
            continue
        if verbose:
            summary = trainer.run(config, workdir)
        else:
            with open(os.path.join(workdir, "progress.txt"), "a") as log, contextlib.redirect_stdout(log):
                summary = trainer.run(config, workdir)
        if summary["stopped_early"]:  # a signal: the sweep stops too, resumable
            raise RuntimeError(f"variant {name!r} stopped after step {summary['last_step']} of "
                               f"{config.train.num_steps}: run the sweep again to resume it")
        results[name] = read_metrics(workdir)
        print(f"{name}: {config.train.num_steps} steps, {_accuracy_line(results[name])} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return results


def _finished_rows(workdir: str, config) -> Rows | None:
    """The metric rows of a run of `config` in `workdir` that evaluated after its last step
    (`_check_workdir` has matched its config), else None."""
    from grpo_jax.metrics import read_metrics

    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return None
    try:
        rows = read_metrics(workdir)
    except (OSError, ValueError):
        return None
    last = config.train.num_steps
    return rows if any(r.get("step") == last and "eval/accuracy" in r for r in rows) else None


def _accuracy_line(rows: Rows) -> str:
    evals = [r for r in rows if "eval/accuracy" in r]
    return (f"eval/accuracy {evals[0]['eval/accuracy']:.3f} -> {evals[-1]['eval/accuracy']:.3f}"
            if evals else "no evaluation")


def curve(rows: Rows, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that carry a finite `key`, in step order."""
    points = sorted((r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key]))
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps, float), np.asarray(values, float)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values: out[i] = mean(values[max(0, i-window+1) : i+1])."""
    values = np.asarray(values, float)
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_curves(results: Mapping[str, Rows], keys: Sequence[str] = ("reward", "eval/accuracy"), *,
                smooth: int = 1, title: str | None = None, path: str | None = None):
    """One panel per metric (in rows of up to three), one line per variant; returns a matplotlib
    `Figure`.

    Training metrics are smoothed by a trailing moving average of `smooth` steps; evaluation
    metrics (`eval/...`, a few points each) are drawn unsmoothed, with markers. Built without
    pyplot (no global figure state, any backend); `path` also writes it as an image.
    """
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        is_eval = key.startswith("eval/")
        for name, rows in results.items():
            steps, values = curve(rows, key)
            if is_eval:
                ax.plot(steps, values, marker="o", label=name)
            else:
                ax.plot(steps, moving_average(values, smooth), label=name)
        suffix = f" (mean of {smooth} steps)" if smooth > 1 and not is_eval else ""
        ax.set_title(key + suffix, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    return _finish_figure(fig, axes, title, path)


def _figure(panels: int):
    """A figure of `panels` panels in rows of up to three (two rows of two for four); its axes."""
    from matplotlib.figure import Figure

    ncols = 2 if panels == 4 else min(panels, 3)
    nrows = -(-panels // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        fig.delaxes(ax)
    return fig, axes


def _finish_figure(fig, axes, title, path):
    """One legend below the panels, the title; written to `path` when given."""
    # The legend of the panel with the most variants (a variant may not log every metric).
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes[:len(fig.axes)]), key=lambda hl: len(hl[1]))
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9)
    if title:
        fig.suptitle(title)
    if path:
        fig.savefig(path, dpi=120)
    return fig


def _format(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def results_table(results: Mapping[str, Rows], train_keys: Sequence[str] = ("reward",),
                  eval_keys: Sequence[str] = ("eval/accuracy",), *, last: int = 10) -> str:
    """A markdown table: per variant, each eval metric before and after GRPO (the first and the
    last evaluation), and each training metric averaged over the `last` training steps."""
    header = ["variant"]
    for key in eval_keys:
        header += [f"{key} before", f"{key} after"]
    header += [f"{key} (last {last} steps)" for key in train_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rows in results.items():
        cells = [name]
        for key in eval_keys:
            _, values = curve(rows, key)
            cells += [_format(values[0]) if values.size else "-", _format(values[-1]) if values.size else "-"]
        for key in train_keys:
            _, values = curve(rows, key)
            cells.append(_format(float(values[-last:].mean())) if values.size else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Seeds: every variant trained under several seeds ("<variant>@<seed>"), tables of mean and spread.

SEED_MARK = "@"


def seeded(variants: Mapping[str, Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Each variant once per seed: {"<name>@<seed>": {**overrides, "seed": seed}} (for `sweep`),
    seed by seed, so the variants of a seed run back to back (timings compare under a load that
    drifts; the seed's warm start is trained once, `sft.cache_dir`)."""
    bad = [name for name in variants if SEED_MARK in name]
    if bad:
        raise ValueError(f"variant names {bad} may not contain {SEED_MARK!r}")
    return {f"{name}{SEED_MARK}{seed}": {**overrides, "seed": int(seed)}
            for seed in seeds for name, overrides in variants.items()}


def by_seed(results: Mapping[str, Rows]) -> dict[str, dict[int, Rows]]:
    """{variant: {seed: rows}} of a `sweep` over `seeded` variants (a name without a seed: seed 0)."""
    out: dict[str, dict[int, Rows]] = {}
    for name, rows in results.items():
        variant, _, seed = name.rpartition(SEED_MARK) if SEED_MARK in name else (name, "", "0")
        out.setdefault(variant, {})[int(seed)] = rows
    return out


def final_value(rows: Rows, key: str, *, step: int | None = None, last: int = 1,
                steps_between: tuple[int, int] | None = None) -> float:
    """`key` at `step` (its last row there), the mean of its values at steps `steps_between`
    (inclusive), or the mean of its `last` values; NaN when absent."""
    steps, values = curve(rows, key)
    if steps_between is not None:
        inside = values[(steps >= steps_between[0]) & (steps <= steps_between[1])]
        return float(inside.mean()) if inside.size else float("nan")
    if step is not None:
        values = values[steps == step]
        return float(values[-1]) if values.size else float("nan")
    return float(values[-last:].mean()) if values.size else float("nan")


def seed_values(results: Mapping[str, Rows], key: str, **where) -> dict[str, np.ndarray]:
    """{variant: [value per seed]} of `final_value(rows, key, **where)`, seeds in order."""
    return {variant: np.asarray([final_value(runs[s], key, **where) for s in sorted(runs)])
            for variant, runs in by_seed(results).items()}


def separated(values: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """Pairs (a, b) of variants whose seeds' ranges do not overlap, a's above b's: the
    comparisons that differ beyond the seeds' spread."""
    pairs = []
    for a, va in values.items():
        for b, vb in values.items():
            if a != b and va.size and vb.size and np.nanmin(va) > np.nanmax(vb):
                pairs.append((a, b))
    return pairs


def above_in_every_seed(values: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """Pairs (a, b) where a's value is above b's for every seed, paired by seed (the variants of
    a seed share its warm start, prompts and sampling keys). Weaker than `separated`: with 3
    seeds, two variants that do not differ are ordered so by chance one time in four."""
    return [(a, b) for a, va in values.items() for b, vb in values.items()
            if a != b and va.size == vb.size and va.size and bool(np.all(va > vb))]


def separation_report(results: Mapping[str, Rows], columns: Mapping[str, tuple[str, Mapping[str, Any]]]) -> str:
    """Markdown: per `seed_table` column, the variant pairs whose seeds' ranges do not overlap
    (`separated`), or that none do; and the pairs ordered the same way in every seed
    (`above_in_every_seed`)."""
    lines = []
    for title, (key, where) in columns.items():
        values = seed_values(results, key, **where)
        pairs, paired = separated(values), above_in_every_seed(values)
        line = f"- {title}: " + (", ".join(f"{a} > {b}" for a, b in pairs) + " beyond the seeds' spread" if pairs
                                 else "no pair differs beyond the seeds' spread")
        extra = [f"{a} > {b}" for a, b in paired if (a, b) not in pairs]
        lines.append(line + (f"; in every seed: {', '.join(extra)}" if extra else ""))
    return "\n".join(lines)


def seed_table(results: Mapping[str, Rows], columns: Mapping[str, tuple[str, Mapping[str, Any]]]) -> str:
    """A markdown table, one row per variant: each column's mean +- std over the seeds, then the
    per-seed values. `columns`: {title: (metric, where)}, `where` the arguments of `final_value`
    ({"step": 10}: the value at step 10; {"last": 5}: the mean of the last 5 steps; {}: the last)."""
    header = ["variant", "seeds"] + [f"{title} (mean +- std)" for title in columns] + \
        [f"{title} per seed" for title in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    per_column = {title: seed_values(results, key, **where) for title, (key, where) in columns.items()}
    for variant, runs in by_seed(results).items():
        cells = [variant, ",".join(str(s) for s in sorted(runs))]
        for values in per_column.values():
            v = values[variant]
            cells.append(f"{np.nanmean(v):.3f} +- {np.nanstd(v):.3f}" if np.isfinite(v).any() else "-")
        for values in per_column.values():
            cells.append(" / ".join(_format(x) for x in values[variant]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_curves(results: Mapping[str, Rows], key: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{variant: (steps, mean over seeds, std over seeds)} of `key` at the steps every seed logged
    (variants that never log it are left out)."""
    out = {}
    for variant, runs in by_seed(results).items():
        curves = [curve(rows, key) for rows in runs.values()]
        common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves))) if curves else []
        if not common:  # the variant does not log `key`
            continue
        stacked = np.asarray([[v[s.tolist().index(x)] for x in common] for s, v in curves], float)
        out[variant] = (np.asarray(common, float), stacked.mean(axis=0), stacked.std(axis=0))
    return out


def plot_seed_curves(results: Mapping[str, Rows], keys: Sequence[str] = ("reward", "eval/accuracy"), *,
                     smooth: int = 1, title: str | None = None, path: str | None = None):
    """`plot_curves` for seeded sweeps: per variant the mean over seeds, a band of +- one std."""
    fig, axes = _figure(len(keys))
    colors = {variant: f"C{i}" for i, variant in enumerate(by_seed(results))}  # one per variant, every panel
    for ax, key in zip(axes, keys):
        is_eval = key.startswith("eval/")
        for variant, (steps, mean, std) in mean_curves(results, key).items():
            if not is_eval:
                mean, std = moving_average(mean, smooth), moving_average(std, smooth)
            ax.plot(steps, mean, marker="o" if is_eval else None, label=variant, color=colors[variant])
            ax.fill_between(steps, mean - std, mean + std, color=colors[variant], alpha=0.2)
        suffix = f" (mean of {smooth} steps)" if smooth > 1 and not is_eval else ""
        ax.set_title(f"{key}{suffix}, mean +- std over seeds", fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    return _finish_figure(fig, axes, title, path)


def strip_outputs(path: str) -> bool:
    """Clears the outputs and execution counts of a notebook file in place (notebooks are
    committed without outputs); returns whether anything changed. Needs `nbformat`."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count, changed = [], None, True
    if changed:
        nbformat.write(nb, path)
    return changed
