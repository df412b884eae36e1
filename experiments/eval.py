r"""Evaluates a run: `python experiments/eval.py --config configs/NAME.py --workdir DIR [--step N]`.

Restores the newest checkpoint of DIR (or step N; the untrained model when DIR has none) and
prints one JSON line of held-out metrics (eval/accuracy, eval/tool_call_rate, pass@k ...).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.trainer import Experiment

    exp = Experiment(_CONFIG.value, _WORKDIR.value)
    checkpointer = Checkpointer(os.path.join(_WORKDIR.value, "checkpoints"))
    if checkpointer.latest_step() is None:
        step, params = 0, exp.init_state().params
    else:
        step, state, _, _ = exp.restore(checkpointer, _STEP.value)
        params = state.params
    metrics, _ = exp.evaluate(params, step)
    checkpointer.close()
    print(json.dumps({"step": step, **metrics}))


if __name__ == "__main__":
    app.run(main)
