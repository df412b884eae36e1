"""The configs of `configs/`, loaded by file as `experiments/train.py --config FILE:ARG` does."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_module(name: str):
    """The module of `configs/<name>.py`."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name: str, arg: str = "runlocal"):
    """`configs/<name>.py`'s `get_config(arg)` (default: its small `runlocal` variant)."""
    return config_module(name).get_config(arg)


def completion_parity(completion) -> float:
    """A reward that varies on an untrained model's text (the parity of its length): a rubric
    plug-in ("config_fixtures:completion_parity") that gives the runlocal runs a gradient."""
    return float(sum(len(m["content"]) for m in completion if m["role"] == "assistant") % 2)


VARYING_RUBRIC = {"correct_answer": {"weight": 1.0, "fn": "correct_answer"},
                  "parity": {"weight": 1.0, "fn": "config_fixtures:completion_parity"}}
