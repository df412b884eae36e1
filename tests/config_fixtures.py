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
