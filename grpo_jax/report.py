"""Readable summaries of a run for the console and the README."""

from __future__ import annotations

from typing import Any, Mapping

ROWS = (("accuracy (greedy)", "eval/accuracy"), ("tool-call rate", "eval/tool_call_rate"),
        ("mean reward", "eval/reward"))


def before_after_table(summary: Mapping[str, Any]) -> str:
    """A small markdown table of the held-out evaluation before and after GRPO."""
    before = summary.get("eval_before") or {}
    after = summary.get("eval_after") or {}
    lines = ["| held-out | before GRPO | after GRPO |", "|---|---|---|"]
    for label, key in ROWS:
        if key in before or key in after:
            fmt = lambda row: f"{row[key]:.3f}" if key in row else "-"
            lines.append(f"| {label} | {fmt(before)} | {fmt(after)} |")
    return "\n".join(lines)
